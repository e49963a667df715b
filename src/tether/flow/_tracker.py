"""Per-task flow state kept by an in-process enforcement point.

:class:`FlowTracker` holds one :class:`tether.core.FlowState` per open task and
applies the pure updates of :mod:`tether.core._flow`: ``called`` after an
allowed call was made, ``returned`` with what the tool answered. ``dump`` and
``load`` give the canonical bytes an enforcement point stores beside the task
so that another node (or a restart) continues from the same state.
"""

from __future__ import annotations

import threading
from typing import Any

import msgspec

from tether.core._flow import (
    AppProfile,
    FlowInput,
    FlowPolicy,
    FlowState,
    observe_call,
    observe_result,
    start,
)
from tether.core._intent import Intent


class FlowTracker:
    def __init__(self, profile: AppProfile, policy: FlowPolicy | None = None) -> None:
        self.profile = profile
        self.policy = policy or FlowPolicy()
        self._states: dict[str, FlowState] = {}
        self._lock = threading.Lock()

    def begin(self, task_id: str, intent: Intent) -> FlowState:
        """Start tracking a task; the intent's request grounds values it names."""
        state = start(intent.request or "")
        with self._lock:
            self._states[task_id] = state
        return state

    def state(self, task_id: str) -> FlowState:
        with self._lock:
            state = self._states.get(task_id)
        if state is None:
            raise KeyError(f"no flow state for task {task_id}")
        return state

    def input(self, task_id: str, tool: str) -> FlowInput:
        """What :func:`tether.core.decide` needs for a call of ``tool`` in this task."""
        return FlowInput(
            state=self.state(task_id), profile=self.profile.tool(tool), policy=self.policy
        )

    def called(self, task_id: str, tool: str, args: dict[str, Any]) -> FlowState:
        """Record an allowed call (call only for ``allow``: a refused call changes nothing)."""
        with self._lock:
            state = observe_call(self._states[task_id], tool, args, self.profile.tool(tool))
            self._states[task_id] = state
        return state

    def returned(self, task_id: str, tool: str, result: Any) -> FlowState:
        """Record what ``tool`` returned (JSON-like)."""
        with self._lock:
            state = observe_result(self._states[task_id], tool, result, self.profile.tool(tool))
            self._states[task_id] = state
        return state

    def end(self, task_id: str) -> None:
        with self._lock:
            self._states.pop(task_id, None)

    def dump(self, task_id: str) -> bytes:
        return msgspec.json.encode(self.state(task_id))

    def load(self, task_id: str, data: bytes) -> FlowState:
        state = msgspec.json.decode(data, type=FlowState)
        with self._lock:
            self._states[task_id] = state
        return state
