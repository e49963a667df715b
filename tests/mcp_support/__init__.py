"""Helpers for the MCP gateway tests: a bundled tool server, a broken one, a harness."""
