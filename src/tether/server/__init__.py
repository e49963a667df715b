"""The HTTP API: ``tether serve``."""

from tether.server._app import ServerSettings, create_app, create_metrics_app

__all__ = ["ServerSettings", "create_app", "create_metrics_app"]
