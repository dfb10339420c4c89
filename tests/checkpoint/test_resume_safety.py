"""Resuming never runs code from a checkpoint, and survives damaged or half-written ones.

A crafted ``train_state.pt`` or ``optimizer/.metadata`` (its pickle's ``__reduce__`` runs a
shell command that creates a marker file) is refused with a message that names the file and
says it is not a trusted lmforge checkpoint; the marker must not exist afterwards. Damaged
weights, a ``latest`` naming a missing folder and left-over ``.tmp-step-*`` folders are
handled on the next start.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint.manifest import MANIFEST, read_manifest, write_manifest
from lmforge.checkpoint.sharded import load_sharded
from lmforge.checkpoint.store import find_checkpoint, load_train_state
from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.train import distributed

TINY = [
    "--train.max_steps=4",
    "--train.eval_every=2",
    "--train.save_every=2",
    "--train.log_every=2",
    "--train.batch_size=2",
    "--train.num_threads=1",
    "--sched.warmup_steps=1",
    "--model.n_layer=1",
    "--model.d_model=16",
    "--model.n_head=2",
    "--model.n_kv_head=2",
    "--model.context_length=16",
    "--data.vocab_size=280",
    "--sample.max_new_tokens=2",
    "--train.precision=fp32",  # (the MFU peak is then a quick fp32 matmul, not bf16 on the CPU)
]


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain times a matmul for its MFU figure: seconds per run on a shared CPU, unused here."""
    monkeypatch.setattr("lmforge.recipes.pretrain.peak_flops", lambda *a: (None, "test"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrain run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: a quick brown fox.\n" for i in range(300)))
    assert main(["pretrain", f"--out_dir={root / 'run'}", f"--data.path={corpus}", *TINY]) == 0
    return root / "run"


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


class Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path, fmt: str, wrap: bool) -> None:
    """A pickle that runs the payload: torch.save's zip format or a raw pickle stream."""
    obj = {"step": 4, "evil": Payload(marker)} if wrap else Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":  # (torch.save refuses a file name starting with a dot)
        torch.save(obj, path.with_name("payload.pt"))
        path.with_name("payload.pt").rename(path)
    else:
        path.write_bytes(pickle.dumps(obj))


def resume_cli(ckpt: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``lmforge pretrain --resume=CKPT`` in this process (a new one costs a torch import)."""
    code = main(["pretrain", f"--resume={ckpt}", "--train.max_steps=6"])
    return code, capsys.readouterr().err


def assert_refused(err: str, path: Path) -> None:
    assert f"{path}: not a trusted lmforge checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_crafted_train_state_is_refused_without_running_it(
    run: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    ckpt, marker = run / "checkpoints" / "step-000004", tmp_path / "MARKER"
    write_payload(ckpt / "train_state.pt", marker, fmt, wrap=True)
    with pytest.raises(CheckpointError) as e:
        load_train_state(ckpt)
    assert_refused(str(e.value), ckpt / "train_state.pt")
    code, err = resume_cli(ckpt, capsys)
    assert code == 2, err
    assert_refused(err, ckpt / "train_state.pt")
    if fmt == "zip":  # once as a real command: the exit code of the process
        args = [sys.executable, "-m", "lmforge", "pretrain", f"--resume={ckpt}"]
        proc = subprocess.run([*args, "--train.max_steps=6"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert_refused(proc.stderr, ckpt / "train_state.pt")
    assert not marker.exists()


def _without_optimizer(ckpt: Path, layout: bool) -> dict:
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    del state["optimizer"]
    if layout:  # what an old sharded checkpoint records
        state["optimizer_layout"] = {"strategy": "fsdp", "tp_size": 0}
    torch.save(state, ckpt / "train_state.pt")
    return state


@pytest.mark.parametrize("fmt", ["zip", "raw"])
@pytest.mark.parametrize(
    "claims", ["nothing", "manifest", "old-layout"], ids=lambda c: f"sharded-by-{c}"
)
def test_crafted_optimizer_metadata_is_never_unpickled(
    run: Path, tmp_path: Path, fmt: str, claims: str, capsys: pytest.CaptureFixture
) -> None:
    """No claim of being sharded: the optimizer/ folder is not read at all. A claim (a forged
    manifest, or an old checkpoint's layout record): the metadata reader refuses the pickle."""
    ckpt, marker = run / "checkpoints" / "step-000004", tmp_path / "MARKER"
    state = _without_optimizer(ckpt, layout=claims == "old-layout")
    if claims == "manifest":
        m = read_manifest(ckpt)
        write_manifest(ckpt, m.model_copy(update={"sharded_optimizer": True}))
    if claims == "old-layout":
        (ckpt / MANIFEST).unlink()
    write_payload(ckpt / "optimizer" / ".metadata", marker, fmt, wrap=False)

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError) as e:
        distributed.load_optimizer(distributed.SINGLE, model, optimizer, ckpt, state)
    if claims == "nothing":
        assert "not a sharded one" in str(e.value)
    else:
        assert_refused(str(e.value), ckpt / "optimizer" / ".metadata")
    code, err = resume_cli(ckpt, capsys)
    assert code == 2, err
    if claims == "nothing":
        assert "not a sharded one" in err and "Traceback" not in err
    else:
        assert_refused(err, ckpt / "optimizer" / ".metadata")
    assert not marker.exists()


def test_real_sharded_optimizer_state_loads_through_the_safe_reader(tmp_path: Path) -> None:
    """The allow-list covers what torch.distributed.checkpoint really writes (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
    saved = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": saved}, checkpoint_id=str(tmp_path / "optimizer"))

    model.zero_grad(set_to_none=True)  # as on resume: no gradients, so torch makes empty state
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    holder = {"optimizer": get_optimizer_state_dict(model, fresh)}
    load_sharded(holder, tmp_path / "optimizer")
    got = holder["optimizer"]
    assert got["param_groups"][0]["lr"] == 0.01 and tuple(got["param_groups"][0]["betas"]) == (
        0.8,
        0.9,
    )
    for name, s in saved["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(got["state"][name][key], value, rtol=0, atol=0)


def test_crafted_value_inside_the_shards_is_refused(tmp_path: Path) -> None:
    """DCP stores non-tensor values as pickles inside its shard files, and its own planner
    reads them with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "MARKER"
    dcp.save({"lr": Payload(marker)}, checkpoint_id=str(tmp_path / "optimizer"))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_sharded({"lr": 0.1}, tmp_path / "optimizer")
    assert_refused(str(e.value), tmp_path / "optimizer")
    assert "value lr" in str(e.value) and not marker.exists()


def test_shard_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"x": torch.ones(2)}, checkpoint_id=str(tmp_path / "optimizer"))
    meta_path = tmp_path / "optimizer" / ".metadata"
    meta = pickle.loads(meta_path.read_bytes())  # the test's own file
    for info in meta.storage_data.values():
        info.relative_path = "../../etc/passwd"
    meta_path.write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_sharded({"x": torch.zeros(2)}, tmp_path / "optimizer")


@pytest.mark.parametrize("size", [0, 100], ids=["empty", "truncated"])
def test_damaged_weights_are_named_and_resume_falls_back(
    run: Path, size: int, capsys: pytest.CaptureFixture
) -> None:
    step4 = run / "checkpoints" / "step-000004" / "model.safetensors"
    step4.write_bytes(step4.read_bytes()[:size])
    # generate (a checkpoint folder given directly): an error naming the file
    assert main(["generate", f"--checkpoint={step4.parent}", "--prompt=Line"]) == 2
    err = capsys.readouterr().err
    assert f"{step4} is damaged" in err and "Traceback" not in err
    # resume through the run folder: step 2, saying why
    assert main(["pretrain", f"--out_dir={run}", "--resume", "--train.max_steps=6"]) == 0
    err = capsys.readouterr().err
    assert f"{step4} is damaged" in err and "step-000002" in err
    steps = (run / "metrics.jsonl").read_text()
    assert '"step": 6' in steps and (run / "checkpoints" / "step-000006").is_dir()


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(run / "checkpoints" / "step-000004")
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run) == run / "checkpoints" / "step-000002"
    assert "latest names step-000004, which is missing" in caplog.text
    shutil.rmtree(run / "checkpoints" / "step-000002")
    with pytest.raises(CheckpointError, match="names step-000004.*no other complete checkpoint"):
        find_checkpoint(run)


def test_stale_temporary_save_is_removed_when_the_run_resumes(run: Path) -> None:
    stale = run / "checkpoints" / ".tmp-step-000006"
    stale.mkdir()  # an empty folder left by a save that failed
    assert main(["pretrain", f"--out_dir={run}", "--resume", "--train.max_steps=5"]) == 0
    assert not stale.exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))
