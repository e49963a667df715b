"""An MCP server over stdio that handshakes properly, then answers calls with garbage.

Hand-written JSON-RPC (no SDK), so it can break the protocol: a ``tools/call``
gets a line that is not JSON, then a response whose result is not a
``CallToolResult``.
"""

from __future__ import annotations

import json
import sys


def send(message: object) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        method, rid = request.get("method"), request.get("id")
        if rid is None:
            continue  # a notification
        if method == "initialize":
            send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "result": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "garbage", "version": "0"},
                    },
                }
            )
        elif method == "tools/list":
            tool = {"name": "noise", "inputSchema": {"type": "object", "properties": {}}}
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": [tool]}})
        elif method == "tools/call":
            sys.stdout.write("%%% this is not JSON-RPC %%%\n")
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": "not a list", "isError": 7}})
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no"}})


if __name__ == "__main__":
    main()
