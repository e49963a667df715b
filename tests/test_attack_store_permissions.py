"""The home and the store files are private on every init and open.

Attacker: a store writer without the KEK, here any other local user. ``tether init``
into a home that already existed (made by ``mkdir`` with the usual umask) left it 0755
and created ``tether.db`` 0644: every local user could read every receipt, task and
sealed key, and the directory's mode survived into every later open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tether import Tether

from .server_support import Backend


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _store_files(home: Path) -> list[Path]:
    return [p for p in home.iterdir() if p.name.startswith("tether.db")]


def test_init_into_an_existing_home_makes_it_private(tmp_path: Path) -> None:
    """Store writer without the KEK (another local user): an existing 0755 home
    becomes 0700 and the store is created 0600, whatever the umask."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # noqa: S103 - the loose mode under test
    old = os.umask(0o022)
    try:
        t = Tether.init(home, "acme.example")
        t.register_identity("spiffe://acme.example/agent/a", kind="agent", owner="a@acme.example")
    finally:
        os.umask(old)
    assert _mode(home) == 0o700
    if Backend.kind == "sqlite":
        files = _store_files(home)
        assert any(p.name == "tether.db" for p in files)
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    t.close()


def test_open_restores_the_modes(tmp_path: Path) -> None:
    """Store writer without the KEK: modes loosened after init are tightened again at
    the next open, for the home and every store file."""
    home = tmp_path / "home"
    Tether.init(home, "acme.example").close()
    os.chmod(home, 0o755)  # noqa: S103 - the loose mode under test
    for p in _store_files(home):
        os.chmod(p, 0o644)
    t = Tether.open(home)
    assert _mode(home) == 0o700
    for p in _store_files(home):
        assert _mode(p) == 0o600, p.name
    t.close()


@pytest.mark.sqlite_only("the store files are SQLite's")
def test_a_store_opened_anywhere_is_created_0600(tmp_path: Path) -> None:
    """Store writer without the KEK: the SQLite store alone (outside a home) is never
    created with the umask's mode."""
    from tether.store._sqlite import SQLiteStore

    path = tmp_path / "elsewhere.db"
    old = os.umask(0o022)
    try:
        store = SQLiteStore(path)
        store.set_meta("x", "y")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    for p in tmp_path.iterdir():
        assert _mode(p) == 0o600, p.name
    store.close()
