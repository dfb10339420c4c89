"""Each benchmark's ``--quick`` mode runs to the end (a smoke test, no figure is checked).

bench/export.py broke silently once (a changed function signature in the code it calls) and
was found only when its figures were needed; these runs catch that. Slow: each loads models
and exports or trains for tens of seconds (`make test-all`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["bench/export.py", "--model", "demo", "--quick", "--threads", "1"],
        ["bench/augment.py", "--seeds", "1", "--steps", "20", "--out", "{tmp}/augment.json"],
    ],
    ids=["export", "augment"],
)
def test_bench_quick_mode_runs(args: list[str], tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
