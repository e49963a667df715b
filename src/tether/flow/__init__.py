"""Information flow as a service: intent compilation and per-task flow tracking.

The rules and the state are in :mod:`tether.core._flow` (pure); this package
holds what an enforcement point uses around them.
"""

from tether.flow._compiler import IntentCompiler, RuleCompiler, ScoredCompiler, asks_for
from tether.flow._tracker import FlowTracker

__all__ = ["FlowTracker", "IntentCompiler", "RuleCompiler", "ScoredCompiler", "asks_for"]
