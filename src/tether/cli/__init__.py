"""The ``tether`` command line."""

from tether.cli._app import app, main

__all__ = ["app", "main"]
