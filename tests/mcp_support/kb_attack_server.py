"""The knowledge base of ``kb_server.py``, with answers shaped to test how labels follow
the data (each tool is catalogued like ``kb_retrieve``: a read whose records carry a
``classification`` field):

- ``kb_retrieve``: as in ``kb_server.py``;
- ``kb_retrieve_text``: the record as JSON text only (no structured content), as many
  MCP servers answer;
- ``kb_mixed``: structured content that is the public FAQ, and a text block (what the
  model reads) that is the memo's record as JSON;
- ``kb_almost``: the memo's record as structured content, and a text block that is its
  JSON almost exactly, classification ``public``;
- ``kb_block_meta``: a text block whose own ``_meta`` labels it confidential (the
  result's ``_meta`` says nothing);
- ``kb_deep``: the memo's record nested deeper than Tether reads;
- ``kb_titled``: the memo marked CONFIDENTIAL in its title, classification ``internal``;
- ``kb_blob``: the marked note as an embedded resource's base64 blob (text/plain);
- ``kb_passages``: a search answer whose documents carry their classification and whose
  passages (the text) refer to them by id.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp_types import BlobResourceContents, CallToolResult, EmbeddedResource, TextContent

try:
    from .kb_server import DOCS
except ImportError:  # run as a script
    from kb_server import DOCS  # type: ignore[import-not-found,no-redef]

server = MCPServer("test-kb-attack", version="1.0.0")

MEMO = DOCS["memo-heron"]
FAQ = DOCS["faq-returns"]
DEPTH = 13
BLOCK_TEXT = (
    "Dana Smith is on a personal improvement plan until the end of the quarter, with "
    "two performance warnings this year and salary band seven."
)


@server.tool(description="Retrieve one knowledge-base document by id.")
def kb_retrieve(doc_id: str) -> dict[str, Any]:
    return dict(DOCS[doc_id])


@server.tool(description="A document as JSON text.", structured_output=False)
def kb_retrieve_text(doc_id: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(DOCS[doc_id]))])


@server.tool(description="A document, structured and as text.", structured_output=False)
def kb_mixed(doc_id: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(MEMO))],
        structured_content=dict(FAQ),
    )


@server.tool(description="A document, structured and as text.", structured_output=False)
def kb_almost(doc_id: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps({**MEMO, "classification": "public"}))],
        structured_content=dict(MEMO),
    )


@server.tool(description="A labelled block.", structured_output=False)
def kb_block_meta(doc_id: str) -> CallToolResult:
    block = TextContent(
        type="text",
        text=BLOCK_TEXT,
        _meta={"tether.dev/label": {"sensitivity": "confidential"}},
    )
    return CallToolResult(content=[block])


@server.tool(description="A deeply nested document.", structured_output=False)
def kb_deep(doc_id: str) -> CallToolResult:
    value: Any = dict(MEMO)
    for _ in range(DEPTH):
        value = {"inner": value}
    return CallToolResult(
        content=[TextContent(type="text", text="nested")], structured_content=value
    )


@server.tool(description="A document marked in its title.")
def kb_titled(doc_id: str) -> dict[str, Any]:
    return {**MEMO, "title": "CONFIDENTIAL - Project Heron", "classification": "internal"}


@server.tool(description="Search: documents and passages.")
def kb_passages(query: str) -> dict[str, Any]:
    return {
        "documents": [{"id": MEMO["id"], "classification": "confidential"}],
        "passages": [{"doc_id": MEMO["id"], "text": MEMO["body"]}],
    }


@server.tool(description="A document as an attachment.", structured_output=False)
def kb_blob(doc_id: str) -> CallToolResult:
    blob = base64.b64encode(DOCS["note-canteen"]["body"].encode()).decode()
    contents = BlobResourceContents(uri="kb://note-canteen", mime_type="text/plain", blob=blob)
    return CallToolResult(content=[EmbeddedResource(type="resource", resource=contents)])


@server.tool(description="Send an e-mail.", structured_output=False)
def send_email(to: str, subject: str, body: str) -> str:
    return f"sent {len(body)} characters to {to}"


if __name__ == "__main__":
    server.run()
