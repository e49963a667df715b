"""The one enforcement pipeline every door calls (see :mod:`tether.enforcement._pipeline`)."""

from tether.enforcement._pipeline import (
    Enforcement,
    Observation,
    ObservationRefused,
    Receipt,
)
from tether.enforcement._snapshot import FlowUnavailable, SnapshotLoader

__all__ = [
    "Enforcement",
    "FlowUnavailable",
    "Observation",
    "ObservationRefused",
    "Receipt",
    "SnapshotLoader",
]
