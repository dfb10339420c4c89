"""Checkpoints are atomic: a process killed while saving leaves the previous one whole."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint.store import (
    find_checkpoint,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from lmforge.errors import CheckpointError
from lmforge.models.decoder import Decoder, DecoderConfig

CFG = dict(arch="gpt2", vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32)


def test_save_load_round_trip_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**CFG))
    ckpt = save_checkpoint(tmp_path, 7, model, {"step": 7}, {"config.yaml": "model: {}\n"})
    assert ckpt.name == "step-000007" and find_checkpoint(tmp_path) == ckpt
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.yaml",
        "manifest.json",
        "model.safetensors",
        "train_state.pt",
    ]
    other = Decoder(DecoderConfig(**CFG))
    load_weights(other, ckpt)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other.lm_head.weight is other.tok_emb.weight  # still tied after loading
    assert load_train_state(ckpt) == {"step": 7}


def test_keep_last_prunes_but_keeps_best(tmp_path: Path) -> None:
    model = Decoder(DecoderConfig(**CFG))
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, None, {}, keep_last=2, is_best=step == 1)
    names = sorted(
        p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-")
    )
    assert names == ["step-000001", "step-000003", "step-000004"]


def test_mismatched_weights_and_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path, 1, Decoder(DecoderConfig(**CFG)), None, {})
    bigger = Decoder(DecoderConfig(**{**CFG, "d_model": 64}))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weights(bigger, ckpt)
    with pytest.raises(CheckpointError, match="no such file"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="train_state.pt: missing"):
        load_train_state(ckpt)


CHILD = textwrap.dedent(
    """
    import sys, torch
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.checkpoint import store as checkpoint
    run_dir = sys.argv[1]
    model = Decoder(DecoderConfig(arch="llama", vocab_size=4096, context_length=64, n_layer=4, n_head=4, d_model=256))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    checkpoint.save_checkpoint(run_dir, 1, model, {"step": 1, "optimizer": opt.state_dict()}, {"config.yaml": "x"})
    print("saved", flush=True)
    step = 2
    while True:  # keep saving until killed
        checkpoint.save_checkpoint(run_dir, step, model, {"step": step, "optimizer": opt.state_dict()}, {})
        step += 1
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = find_checkpoint(tmp_path)  # whatever `latest` names is complete
    model = Decoder(
        DecoderConfig(
            arch="llama", vocab_size=4096, context_length=64, n_layer=4, n_head=4, d_model=256
        )
    )
    load_weights(model, ckpt)
    state = load_train_state(ckpt)
    assert state["step"] == int(ckpt.name.split("-")[1])
    assert "optimizer" in state
