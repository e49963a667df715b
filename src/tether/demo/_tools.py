"""The demo's bank, as a small MCP tool server over stdio (``python -m tether.demo._tools``).

The MCP gateway launches it as an upstream and shows its tools as ``bank.<tool>``.
It knows nothing of Tether: every decision is the gateway's. ``read_balance``
leaks, as upstreams do, a debug line with a database connection string and an
AWS access key (both fake); the gateway redacts them before the agent sees them.
"""

from __future__ import annotations

import json
import logging

import anyio
from mcp.server.mcpserver import MCPServer

ACCOUNT = "DE02120300000000202051"
# Fake credentials, assembled so that no scanner mistakes this file for a leak.
LEDGER_DSN = "postgres://ledger_ro:" + "Tr0ub4dor-ledger" + "@ledger.internal:5432/bank"
AWS_KEY_ID = "AKIA" + "EXAMPLE7DEMO2KEY"

BILLS = [
    {"payee": "DE50526018159083016613", "biller": "Stadtwerke", "amount": 240.0, "due": "05-31"},
    {"payee": "DE50526018159083016613", "biller": "Stadtwerke", "amount": 1200.0, "due": "06-30"},
]

server = MCPServer("acme-bank", version="1.0.0")


@server.tool(description="List the account's outstanding bills.", structured_output=False)
def read_bills() -> str:
    return json.dumps(BILLS)


@server.tool(description="The account's balance.", structured_output=False)
def read_balance() -> str:
    return (
        f"balance of {ACCOUNT}: 4210.55 EUR\n"
        f"debug: ledger={LEDGER_DSN} aws_access_key_id={AWS_KEY_ID}"
    )


@server.tool(description="Transfer money to an IBAN.", structured_output=False)
def send_money(recipient: str, amount: float) -> str:
    return f"{amount:.2f} EUR sent from {ACCOUNT} to {recipient}"


@server.tool(description="Close an account and pay out its balance.", structured_output=False)
def close_account(iban: str) -> str:
    return f"account {iban} closed"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    anyio.run(server.run_stdio_async)


if __name__ == "__main__":
    main()
