"""The README's tour, run as written: bash, the real ``tether`` CLI against a running
``tether serve`` (only the paths and the port are this test's own)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .server_support import free_port

ROOT = Path(__file__).resolve().parents[1]


def _tour() -> str:
    """The first ``sh`` block after the tour's introduction."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Every verb takes `--json`")
    match = re.search(r"```sh\n(.*?)```", readme[start:], re.S)
    assert match is not None, "no tour in the README"
    return match.group(1)


@pytest.mark.sqlite_only("the tour bootstraps its own home, as a first reader would")
def test_the_readme_tour_runs_against_a_server(tmp_path: Path) -> None:
    """Attacker: none; the tour a platform engineer follows first works as printed, and
    its receipts name the admin credential, never a typed name."""
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the tour uses jq and curl")
    port = free_port()
    home = tmp_path / "tour"
    script = (
        _tour()
        .replace(". .venv/bin/activate", "")
        .replace("/tmp/tether-tour.credential", str(tmp_path / "tour.credential"))
        .replace("/tmp/tether-tour", str(home))
        .replace("8700", str(port))
        .replace("bundle.json", str(tmp_path / "bundle.json"))
    )
    shim = tmp_path / "bin"
    shim.mkdir()
    tether = shim / "tether"
    tether.write_text(f'#!/bin/sh\nexec {sys.executable} -m tether "$@"\n')
    tether.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT / "src")
    wrapped = (
        f"set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\ncd {ROOT}\n" + script
    )
    done = subprocess.run(
        ["bash", "-c", wrapped],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "trust domain acme.example created" in out
    assert (tmp_path / "tour.credential").stat().st_mode & 0o777 == 0o600
    secret = (tmp_path / "tour.credential").read_text().strip()
    assert secret not in out + done.stderr
    assert "allow" in out and "deny" in out
    assert "receipts" in out and "verified" in out
