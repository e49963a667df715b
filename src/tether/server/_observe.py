"""Observability: Prometheus metrics and structured JSON logs (never a secret)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LOG = logging.getLogger("tether.server")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "tether_decisions",
            "Decisions by effect, reason code and tool (a catalogued name, else other)",
            ["effect", "rule", "tool"],
            registry=self.registry,
        )
        self.decision_latency = Histogram(
            "tether_decision_seconds",
            "Time to decide one call (verify, intent, Cedar)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=self.registry,
        )
        self.tokens = Counter(
            "tether_task_tokens",
            "Task tokens by event (issued, revoked, expired)",
            ["event"],
            registry=self.registry,
        )
        self.approvals_pending = Gauge(
            "tether_approvals_pending",
            "Approvals waiting for a human",
            registry=self.registry,
        )
        self.unauthenticated = Counter(
            "tether_unauthenticated_requests",
            "Requests refused before authentication, by reason code (no receipt each)",
            ["code"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tether_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object a line. Only the fields put in ``extra={"fields": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        return json.dumps(entry, sort_keys=True, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False


def log_request(
    method: str, route: str, status: int, started: float, principal: str | None, **extra: Any
) -> None:
    LOG.info(
        "request",
        extra={
            "fields": {
                "method": method,
                "route": route,
                "status": status,
                "principal": principal,
                "ms": round((time.perf_counter() - started) * 1000, 3),
                **extra,
            }
        },
    )
