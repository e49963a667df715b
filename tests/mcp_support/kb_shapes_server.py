"""The knowledge base of ``kb_server.py``, answering in shapes that leave the memo's text
unfingerprinted (each tool is catalogued like ``kb_retrieve``):

- ``kb_fenced``: the record as JSON text in a markdown code fence, as many servers write it;
- ``kb_pieces``: the record with its body as a list of three-word strings (structured
  content, and the same record as JSON text);
- ``kb_stock``: a confidential record whose lines are stock phrases of customer mail;
- ``send_email``: the sink (the customer reads it).
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

try:
    from .kb_server import DOCS
except ImportError:  # run as a script
    from kb_server import DOCS  # type: ignore[import-not-found,no-redef]

server = MCPServer("test-kb-shapes", version="1.0.0")

MEMO = DOCS["memo-heron"]
STOCK = ["Thank you for your message", "Kind regards, Customer Care"]


@server.tool(description="A document as fenced JSON text.", structured_output=False)
def kb_fenced(doc_id: str) -> CallToolResult:
    text = f"```json\n{json.dumps(DOCS[doc_id])}\n```"
    return CallToolResult(content=[TextContent(type="text", text=text)])


@server.tool(description="A document, its body in short pieces.", structured_output=False)
def kb_pieces(doc_id: str) -> CallToolResult:
    words = DOCS[doc_id]["body"].split()
    record: dict[str, Any] = {
        **DOCS[doc_id],
        "body": [" ".join(words[i : i + 3]) for i in range(0, len(words), 3)],
    }
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(record))], structured_content=record
    )


@server.tool(description="Reply templates.", structured_output=False)
def kb_stock(doc_id: str) -> CallToolResult:
    record = {"id": doc_id, "classification": "confidential", "lines": STOCK}
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(record))], structured_content=record
    )


@server.tool(description="Send an e-mail.", structured_output=False)
def send_email(to: str, subject: str, body: str) -> str:
    return f"sent {len(body)} characters to {to}"


if __name__ == "__main__":
    server.run()
