"""The training doctor on deliberately broken runs: each gets its diagnosis, a healthy run none.

The runs are real (``fit`` on a tiny decoder, a few seconds each); the doctor reads only what
they wrote (metrics.jsonl, config.yaml), as it does for a user's run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.data.loader import TokenBatches
from lmforge.diagnose.doctor import diagnose, read_run
from lmforge.errors import DataError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer

CPU = torch.device("cpu")


def pattern(n: int, seed: int) -> np.ndarray:
    """A learnable stream: a repeating 0..63 ramp with 10 % random tokens."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(64, dtype=np.uint16), n // 64 + 1)[:n]
    return np.where(rng.random(n) < 0.1, rng.integers(0, 64, n), base).astype(np.uint16)


class SpikeAt:
    """Batches from ``inner``, except one batch of random tokens at step ``at``."""

    def __init__(self, inner: TokenBatches, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.context = inner.context

    def next_batch(self):  # noqa: ANN201
        self.calls += 1
        x, y = self.inner.next_batch()
        if self.calls == self.at:
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, 64, x.shape, generator=g), torch.randint(
                0, 64, y.shape, generator=g
            )
        return x, y

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def make_run(
    run_dir: Path,
    *,
    lr: float = 3e-3,
    steps: int = 120,
    grad_clip: float = 1.0,
    train_tokens: np.ndarray | None = None,
    val_tokens: np.ndarray | None = None,
    spike_at: int | None = None,
    d_model: int = 32,
    frozen: bool = False,
) -> Path:
    torch.manual_seed(0)
    cfg = DecoderConfig(arch="llama", vocab_size=64, context_length=16, n_layer=2, n_head=2,
                        d_model=d_model, dropout=0.0)  # fmt: skip
    model = Decoder(cfg)
    if frozen:  # everything but the final norm's gain: a model that cannot learn
        for name, p in model.named_parameters():
            p.requires_grad_(name == "norm_f.weight")
    optim = OptimConfig(lr=lr, weight_decay=0.0)
    train = TrainConfig(max_steps=steps, batch_size=8, eval_every=15, save_every=10_000,
                        log_every=1, device="cpu", grad_clip=grad_clip, log_layer_stats=True)  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"train": train.model_dump(), "optim": optim.model_dump()})
    )
    data = pattern(4000, 0) if train_tokens is None else train_tokens
    batches = TokenBatches(data, 16, 8, seed=0)
    fit(
        model, build_optimizer(model, optim), SpikeAt(batches, spike_at) if spike_at else batches,
        train, peak_lr=lr, sched=SchedConfig(warmup_steps=5), run_dir=run_dir, device=CPU,
        checkpoint_files={}, val_tokens=pattern(800, 1) if val_tokens is None else val_tokens,
    )  # fmt: skip
    return run_dir


def kinds(run_dir: Path) -> dict[str, str]:
    return {f.kind: f.evidence + " | " + f.remedy for f in diagnose(run_dir)}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("doctor") / "healthy")


def test_a_healthy_run_gets_no_findings(healthy: Path) -> None:
    assert kinds(healthy) == {}


def test_lr_times_100_is_diagnosed(tmp_path: Path) -> None:
    found = kinds(make_run(tmp_path / "lr", lr=0.3))
    assert "lr_too_high" in found, found  # it did not diverge: it learnt badly and noisily
    assert "optim.lr=0.3" in found["lr_too_high"]


def test_a_spike_without_clipping_is_found_with_its_step(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "spike", grad_clip=0.0, spike_at=80)
    findings = {f.kind: f for f in diagnose(run_dir)}
    assert "loss_spike" in findings, findings
    assert 80 in findings["loss_spike"].steps
    assert "train.grad_clip=1.0" in findings["loss_spike"].remedy  # clipping was off


def test_a_tiny_dataset_overfits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiny = rng.integers(0, 64, 200).astype(np.uint16)  # memorisable, and unlike the val text
    found = kinds(make_run(tmp_path / "overfit", lr=1e-2, steps=150, d_model=64,
                           train_tokens=tiny, val_tokens=rng.integers(0, 64, 800).astype(np.uint16)))  # fmt: skip
    assert "overfitting" in found, found
    assert "early_stop_patience" in found["overfitting"]


def test_a_frozen_model_is_not_learning(tmp_path: Path) -> None:
    found = kinds(make_run(tmp_path / "frozen", frozen=True, steps=60))
    assert "underfitting" in found, found
    assert "not learning" in found["underfitting"]
    assert "trainable" in found["underfitting"]  # the remedy points at frozen parameters


def test_layer_statistics_are_recorded(healthy: Path) -> None:
    step, layers = read_run(healthy).layers[-1]
    assert step == 120
    assert {"tok_emb", "blocks.0", "blocks.1", "lm_head"} <= set(layers)
    for name in ("blocks.0", "blocks.1"):
        assert layers[name]["grad_norm"] > 0
        assert 1e-5 < layers[name]["update_ratio"] < 1e-1
        assert 0.0 <= layers[name]["dead_frac"] <= 1.0


def write_metrics(run_dir: Path, events: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in events) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def falling(n: int, **extra) -> list[dict]:
    return [{"step": s, "loss": 4.0 * 0.98**s, "grad_norm": 1.0, **extra} for s in range(1, n + 1)]


def test_vanishing_gradients_from_layer_statistics(tmp_path: Path) -> None:
    layers = {"blocks.0": {"grad_norm": 1e-7}, "blocks.1": {"grad_norm": 1e-1}}
    events = [e | {"layers": layers} for e in falling(20)]
    found = kinds(write_metrics(tmp_path / "r", events))
    assert "vanishing_gradients" in found and "blocks.0" in found["vanishing_gradients"]


def test_waiting_for_data(tmp_path: Path) -> None:
    found = kinds(write_metrics(tmp_path / "r", falling(20, data_frac=0.6)))
    assert set(found) == {"data_bottleneck"}
    assert "60 %" in found["data_bottleneck"]


def test_a_live_runs_half_written_line_is_skipped_a_damaged_one_named(tmp_path: Path) -> None:
    assert kinds(write_metrics(tmp_path / "live", falling(20), tail='{"step": 21, "lo')) == {}
    bad = write_metrics(tmp_path / "bad", falling(3))
    (bad / "metrics.jsonl").write_text("{oops\n" + (bad / "metrics.jsonl").read_text())
    with pytest.raises(DataError, match=r"metrics.jsonl:1: .*damaged"):
        diagnose(bad)
    with pytest.raises(DataError, match="no metrics.jsonl"):
        diagnose(tmp_path / "nothing")


def test_cli_json_and_report(healthy: Path, tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "lr", lr=0.3)
    out = subprocess.run([sys.executable, "-m", "lmforge", "doctor", str(run_dir), "--json"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    findings = json.loads(out)
    assert findings and {"kind", "severity", "evidence", "remedy"} <= set(findings[0])
    assert "lr_too_high" in {f["kind"] for f in findings}
    report = (run_dir / "doctor.md").read_text()
    assert "lr_too_high" in report and (run_dir / "doctor.png").stat().st_size > 1000
    missing = subprocess.run([sys.executable, "-m", "lmforge", "doctor", str(tmp_path / "nope")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 1 and "no metrics.jsonl" in missing.stderr
