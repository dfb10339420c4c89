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
        # every patched speedrun lever at once, two steps (bench/speedrun.py runs them this way)
        [
            "bench/speedrun_patches.py",
            "softcap=30",
            "zero_proj",
            "relu2",
            "adamw_lr_scale=10",
            "--",
            "pretrain",
            "--out_dir={tmp}/run",
            "--train.max_steps=2",
            "--train.eval_every=2",
            "--optim.name=muon",
            "--model.mlp=gelu",
            "--model.d_ff=1024",
            "--sample.max_new_tokens=1",
            "--train.num_threads=1",
        ],
    ],
    ids=["export", "augment", "speedrun_patches"],
)
def test_bench_quick_mode_runs(args: list[str], tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
