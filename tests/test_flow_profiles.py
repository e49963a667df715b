"""The AgentDojo application profiles stay application descriptions (fair play)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
from bench.agentdojo.profiles import PROFILES

from tether.core import AppProfile, SideEffect
from tether.core._flow import atoms
from tether.flow import RuleCompiler

pytestmark = pytest.mark.store_independent  # no Tether: the same on every store

SOURCE = Path(__file__).resolve().parents[1] / "bench" / "agentdojo" / "profiles.py"


def test_profiles_name_no_task_and_embed_no_value() -> None:
    text = SOURCE.read_text()
    assert not re.search(r"(user|injection)_task", text)
    for profile in PROFILES.values():
        for name, tool in profile.tools.items():
            for phrase in tool.phrases:
                assert not atoms(phrase), (name, phrase)
                assert not any(c.isdigit() for c in phrase), (name, phrase)


def test_profiles_are_valid_and_every_action_has_phrases() -> None:
    assert set(PROFILES) == {"workspace", "slack", "travel", "banking"}
    for profile in PROFILES.values():
        again = msgspec.convert(msgspec.to_builtins(profile), AppProfile)
        assert again == profile
        for name, tool in profile.tools.items():
            if tool.side_effect is not SideEffect.READ:
                assert tool.phrases and tool.sinks is not None, name
        # A request that asks for nothing but reading declares no action.
        intent = RuleCompiler().compile("What do I have?", profile)
        for cap in intent.capabilities:
            assert profile.tool(cap.tool).side_effect is SideEffect.READ
