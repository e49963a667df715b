"""A knowledge base and a help desk in one MCP server (stdio), for per-result labels.

``kb_retrieve`` returns the public FAQ and the confidential memo alike, each with its
``classification`` field; ``hr_lookup`` declares its result's label itself, in the
result's ``_meta`` (FIDES-style ``ifc``); ``send_email`` and ``ticket_comment`` are the
sinks (a customer reads both).
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

server = MCPServer("test-kb", version="1.0.0")

DOCS: dict[str, dict[str, str]] = {
    "faq-returns": {
        "id": "faq-returns",
        "title": "Returns",
        "classification": "public",
        "body": (
            "Customers may return any unused item within thirty days of delivery for a "
            "full refund. Refunds go back to the original payment method within five "
            "working days of the return being received."
        ),
    },
    "memo-heron": {
        "id": "memo-heron",
        "title": "Project Heron",
        "classification": "confidential",
        "body": (
            "The board approved the purchase of a regional competitor for forty two "
            "million euros. The announcement is planned for the first week of March and "
            "nobody outside the deal team may hear of it before then."
        ),
    },
    "note-canteen": {
        "id": "note-canteen",
        "title": "Canteen",
        "classification": "internal",
        "body": (
            "CONFIDENTIAL: the canteen supplier changes next month and the new contract "
            "price per meal rises by eleven percent for every site in the region."
        ),
    },
}


@server.tool(description="Retrieve one knowledge-base document by id.")
def kb_retrieve(doc_id: str) -> dict[str, Any]:
    return dict(DOCS.get(doc_id, {"id": doc_id, "classification": "public", "body": ""}))


@server.tool(description="An employee's HR record.", structured_output=False)
def hr_lookup(name: str) -> CallToolResult:
    text = (
        f"HR record of {name}: salary band seven, two performance warnings this year, "
        "on a personal improvement plan until the end of the quarter."
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        _meta={"ifc": {"confidentiality": "private", "integrity": "trusted"}},
    )


@server.tool(description="Send an e-mail.", structured_output=False)
def send_email(to: str, subject: str, body: str) -> str:
    return f"sent {len(body)} characters to {to}"


@server.tool(description="Add a comment to a help-desk ticket.", structured_output=False)
def ticket_comment(ticket_id: str, text: str) -> str:
    return f"commented on {ticket_id}"


if __name__ == "__main__":
    server.run()
