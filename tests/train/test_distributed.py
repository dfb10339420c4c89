"""Distributed training on CPU with gloo: equivalence with one process, sharded checkpoints, failures.

Ranks run in processes from ``torch.multiprocessing.spawn`` (the seam is the same one
torchrun drives); the last test launches real torchrun through ``lmforge pretrain --nproc 2``.
All runs are fp32 without dropout, so the only differences are summation order: tolerances
are rtol 1e-4 / atol 1e-5 on parameters after 3 AdamW steps (measured differences ~1e-7).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmforge.checkpoint.store import load_train_state, load_weights
from lmforge.data.loader import TokenBatches
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train import distributed
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer

CPU = torch.device("cpu")
STEPS, BATCH, ACCUM = 3, 2, 2
RTOL, ATOL = 1e-4, 1e-5


def model_cfg() -> DecoderConfig:
    # GQA (4 query heads, 2 kv heads) and tied embeddings: the cases sharding must get right.
    return DecoderConfig(
        arch="llama",
        vocab_size=64,
        context_length=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        dropout=0.0,
        tie_embeddings=True,
    )


def tokens(n: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(64, dtype=np.uint16), n // 64 + 1)[:n]
    return np.where(rng.random(n) < 0.2, rng.integers(0, 64, n), base).astype(np.uint16)


def train_cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=STEPS,
        batch_size=BATCH,
        grad_accum=ACCUM,
        eval_every=100,
        save_every=2,
        keep_last=10,
        log_every=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


PROBE = torch.arange(32).reshape(2, 16) % 64  # a fixed input whose logits are compared


def run_fit(model, batches, run_dir: Path, par=distributed.SINGLE, resume=None, **kw):
    optimizer = build_optimizer(distributed.unwrap(model), OptimConfig(lr=3e-3))
    return fit(
        model,
        optimizer,
        batches,
        train_cfg(**kw),
        peak_lr=3e-3,
        sched=SchedConfig(warmup_steps=1),
        run_dir=run_dir,
        device=CPU,
        checkpoint_files={"config.yaml": "model: " + model_cfg().model_dump_json() + "\n"},
        resume_from=resume,
        parallel=par,
    )


def _join(rank: int, world: int, port: int) -> None:
    distributed.set_local_rank_env(rank, world, port)
    torch.set_num_threads(1)


def _train_jobs(rank: int, world: int, port: int, strategies: list[str], tp: int, out: str) -> None:
    """One rank, per strategy (one process start for all): STEPS steps → out/<strategy>/run,
    then resume from step 2 → out/<strategy>/resumed."""
    _join(rank, world, port)
    pars = [distributed.setup(DistConfig(strategy=s, tp_size=tp), CPU) for s in strategies]
    for strategy, par in zip(strategies, pars, strict=True):
        _train_job(par, Path(out) / strategy)
    for par in pars:  # the first started the process group and ends it
        distributed.teardown(par)


def _train_job(par: distributed.Parallel, out: Path) -> None:
    """STEPS steps → out/run; then a fresh model resumes from step 2 → out/resumed."""

    def build(resume=None):
        torch.manual_seed(0)
        model = Decoder(model_cfg())
        if resume is not None:
            load_weights(model, resume)
        model = distributed.parallelize(model, par, DistConfig(), "fp32")
        data = TokenBatches(tokens(), 16, BATCH, seed=0, rank=par.dp_rank, world_size=par.dp_size)
        return model, data

    run = Path(out) / "run"
    model, data = build()
    run_fit(model, data, run, par)
    with torch.no_grad():
        logits = model(PROBE)  # every rank takes part (FSDP gathers, TP all-reduces)
    if par.is_main:
        torch.save(logits, Path(out) / "logits.pt")
        shutil.copytree(run, Path(out) / "resumed")
        (Path(out) / "resumed" / "checkpoints" / "latest").write_text("step-000002\n")
    par.barrier()
    step2 = Path(out) / "resumed" / "checkpoints" / "step-000002"
    model, data = build(resume=step2)
    run_fit(model, data, Path(out) / "resumed", par, resume=step2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2-rank ddp and fsdp runs (each: STEPS steps, plus a resume from step 2), run once."""
    root = tmp_path_factory.mktemp("jobs")
    spawn(_train_jobs, 2, ["ddp", "fsdp"], 0, str(root))
    return {s: root / s for s in ("ddp", "fsdp")}


class UnionBatches:
    """Both ranks' micro-batches side by side: what one process must see to match 2-rank DDP."""

    def __init__(self) -> None:
        self.ranks = [
            TokenBatches(tokens(), 16, BATCH, seed=0, rank=r, world_size=2) for r in (0, 1)
        ]
        self.context = 16

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [b.next_batch() for b in self.ranks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def state_dict(self) -> dict:
        return self.ranks[0].state_dict()


def test_ddp_two_ranks_equal_one_process_with_double_batch(jobs, tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_fit(Decoder(model_cfg()), UnionBatches(), tmp_path, batch_size=2 * BATCH)
    assert_same_weights(weights(jobs["ddp"] / "run"), weights(tmp_path))


def test_fsdp_equals_ddp(jobs) -> None:
    # also proves the gathered model.safetensors has single-process names and layout
    assert_same_weights(weights(jobs["fsdp"] / "run"), weights(jobs["ddp"] / "run"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_resume_is_exact(jobs, strategy: str) -> None:
    run = jobs[strategy]
    assert_same_weights(weights(run / "resumed"), weights(run / "run"), rtol=0, atol=0)


def test_fsdp_checkpoint_loads_on_one_process(jobs) -> None:
    ckpt = jobs["fsdp"] / "run" / "checkpoints" / f"step-{STEPS:06d}"
    assert (ckpt / "optimizer" / ".metadata").is_file()  # sharded with torch.distributed.checkpoint
    model = Decoder(model_cfg())
    load_weights(model, ckpt)  # what export / generate / eval do (checkpoint.load)
    with torch.no_grad():
        torch.testing.assert_close(
            model(PROBE), torch.load(jobs["fsdp"] / "logits.pt", weights_only=True)
        )
    # the sharded optimizer state restores into a single-process optimizer (no process group)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3))
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    distributed.load_optimizer(distributed.SINGLE, model, optimizer, ckpt, state)
    qkv = model.blocks[0].attn.qkv.weight
    assert optimizer.state[qkv]["exp_avg"].shape == qkv.shape
    assert float(optimizer.state[qkv]["step"]) == STEPS


def _tp_check(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    par = distributed.setup(DistConfig(strategy="tp"), CPU)
    try:
        torch.manual_seed(0)
        ref = Decoder(model_cfg())
        tp_model = Decoder(model_cfg())
        tp_model.load_state_dict(ref.state_dict())
        distributed.parallelize(tp_model, par, DistConfig(), "fp32")
        x, y = PROBE, (PROBE + 1) % 64
        for model in (ref, tp_model):
            logits = model(x)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)).backward()
            model.logits = logits.detach()
        torch.testing.assert_close(tp_model.logits, ref.logits, rtol=RTOL, atol=ATOL)
        grads = {n: p.grad for n, p in ref.named_parameters()}
        tp_grads = {
            n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in tp_model.named_parameters()
        }
        attn = tp_model.blocks[0].attn
        inverse = torch.argsort(distributed.qkv_tp_order(4, 2, attn.head_dim, 2))
        for n in grads:
            got = tp_grads[n][inverse] if n.endswith("qkv.weight") else tp_grads[n]
            torch.testing.assert_close(
                got, grads[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}"
            )
        # the gathered state dict is the single-process layout
        full = distributed.full_model_state(tp_model)
        if par.is_main:
            for n, t in full.items():
                torch.testing.assert_close(t, ref.state_dict()[n])
    finally:
        distributed.teardown(par)


def test_tp_forward_backward_equal_single_device() -> None:
    spawn(_tp_check, 2)


@pytest.mark.slow  # 4 processes on a 2-core machine: ~25 s
def test_fsdp_tp_2d_mesh_equals_ddp(jobs, tmp_path: Path) -> None:
    # 4 ranks = 2 data-parallel groups x 2 tensor-parallel ranks: same data split as 2-rank DDP.
    spawn(_train_jobs, 4, ["fsdp+tp"], 2, str(tmp_path))
    assert_same_weights(weights(tmp_path / "fsdp+tp" / "run"), weights(jobs["ddp"] / "run"))


def _worker_pid(launcher: int, rank: int) -> int | None:
    """pid of the torchrun worker with RANK=rank started (indirectly) by ``launcher``."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(
            e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env
        ):
            if str(launcher) in _ancestors(entry.name):
                return int(entry.name)
    return None


def _ancestors(pid: str) -> list[str]:
    out = []
    while pid not in ("0", "1"):
        try:
            pid = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            break
        out.append(pid)
    return out


def test_killed_rank_fails_the_job_and_last_checkpoint_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "lmforge", "pretrain", "--nproc", "2", f"--out_dir={run}",
        "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.n_kv_head=2",
        "--model.context_length=32", "--data.vocab_size=300", "--train.batch_size=2",
        "--train.precision=fp32", "--train.eval_every=1000", "--train.save_every=3",
        "--train.log_every=3", "--sched.warmup_steps=1", "--sample.max_new_tokens=4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    job = subprocess.Popen(
        [*args, "--train.max_steps=100000"], env=env, stderr=subprocess.PIPE, text=True
    )
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 60
    while not latest.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), "no checkpoint appeared"
    pid = _worker_pid(job.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0
    assert "rank 1 was stopped by signal SIGKILL" in err  # the launcher names the dead rank
    assert "the 2-process job failed" in err and "--resume" in err
    saved = int(latest.read_text().strip().split("-")[1])
    # continue from the last complete checkpoint, a few steps further
    end = saved + 2
    done = subprocess.run(
        [*args, "--resume", f"--train.max_steps={end}"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest.read_text().strip() == f"step-{end:06d}"


# ---- OOM recovery with several processes -----------------------------------------------------


def _oom_jobs(rank: int, world: int, port: int, out: str) -> None:
    """2-rank DDP: probe the peaks (micro-batch 4 x 2 and 2 x 4, rank 1 tracked), then the
    4 x 2 run again with a budget between them on rank 1 only."""
    import contextlib
    import json

    from lmforge.plan.tracker import BudgetTracker

    _join(rank, world, port)
    par = distributed.setup(DistConfig(strategy="ddp"), CPU)
    cfg = model_cfg().model_copy(update={"context_length": 64, "vocab_size": 256})
    peaks: dict[str, int] = {}

    def job(name: str, batch: int, accum: int, budget: int | None = None, hook=None) -> None:
        torch.manual_seed(0)
        plain = Decoder(cfg)
        if hook is not None and rank == 1:
            plain.blocks[1].register_forward_pre_hook(hook)
        model = distributed.parallelize(plain, par, DistConfig(), "fp32")
        data = TokenBatches(tokens(20000), 64, batch, seed=0, rank=par.dp_rank, world_size=2)
        tracker = BudgetTracker(budget or 2**62) if rank == 1 else contextlib.nullcontext()
        with tracker:
            run_fit(model, data, Path(out) / name, par, batch_size=batch, grad_accum=accum)
        peaks[name] = getattr(tracker, "peak", 0)

    job("probe-big", 4, 2)
    job("ref", 2, 4)
    budget = (peaks["probe-big"] + peaks["ref"]) // 2
    job("oom", 4, 2, budget if peaks["probe-big"] > 1.1 * peaks["ref"] else None)
    calls = []

    def oom_inside_forward(module, args) -> None:  # rank 1, step 1, first micro-batch
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected inside the forward")

    job("oom-forward", 4, 2, hook=oom_inside_forward)
    if rank == 1:
        (Path(out) / "peaks.json").write_text(json.dumps(peaks | {"budget": budget}))
    distributed.teardown(par)


def test_ddp_oom_on_one_rank_splits_on_all_ranks(tmp_path: Path) -> None:
    import json

    spawn(_oom_jobs, 2, str(tmp_path))
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    assert peaks["probe-big"] > 1.1 * peaks["ref"]  # the budget separated the two
    assert peaks["oom"] > peaks["budget"]  # rank 1 crossed its budget (rank 0 had none)
    events = [json.loads(x) for x in (tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()]
    # rank 0 (which logs) split too, once, at step 1: the ranks agreed on the new micro-batch
    assert [(e["step"], e["micro_batch"]) for e in events if e.get("oom")] == [(1, 2)]
    assert max(e["step"] for e in events) == STEPS
    assert_same_weights(weights(tmp_path / "oom"), weights(tmp_path / "ref"), rtol=0, atol=0)
    # an OOM inside rank 1's forward (DDP's forward has no collective: no buffer broadcast)
    events = [
        json.loads(x) for x in (tmp_path / "oom-forward" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(e["step"], e["micro_batch"]) for e in events if e.get("oom")] == [(1, 2)]
    assert_same_weights(weights(tmp_path / "oom-forward"), weights(tmp_path / "ref"), 0, 0)


# ---- OOM under FSDP: record, stop, resume with the finer split ---------------------------------


def _fsdp_oom_jobs(rank: int, world: int, port: int, out: str, phase: str) -> None:
    """2-rank FSDP. phase "first": a reference run with micro-batch 1 x 4 (rank 1's peak
    tracked), a probe with 2 x 2, then the 2 x 2 run again with a budget between the two peaks
    on rank 1 from step 2 on (armed after step 1's checkpoint): rank 1 records the OOM and
    stops, rank 0 fails in its collective. phase "resume": the same 2 x 2 command resumed."""
    import contextlib
    import json

    from lmforge.plan.tracker import BudgetTracker

    _join(rank, world, port)
    par = distributed.setup(DistConfig(strategy="fsdp", timeout_s=60), CPU)
    cfg = model_cfg().model_copy(update={"context_length": 32, "vocab_size": 256})
    root = Path(out)

    def job(name: str, batch: int, accum: int, budget: int | None = None, resume=None) -> int:
        torch.manual_seed(0)
        plain = Decoder(cfg)
        if resume is not None:
            load_weights(plain, resume)
        model = distributed.parallelize(plain, par, DistConfig(), "fp32")
        data = TokenBatches(tokens(8000), 32, batch, seed=0, rank=par.dp_rank, world_size=2)
        tracker = BudgetTracker(2**62) if rank == 1 else contextlib.nullcontext()
        optimizer = build_optimizer(plain, OptimConfig(lr=3e-3))
        if budget is not None and rank == 1:  # the budget applies from step 2 on
            optimizer.register_step_post_hook(lambda *_: setattr(tracker, "budget", budget))
        with tracker:
            fit(
                model, optimizer, data, train_cfg(batch_size=batch, grad_accum=accum, save_every=1),
                peak_lr=3e-3, sched=SchedConfig(warmup_steps=1), run_dir=root / name, device=CPU,
                checkpoint_files={"config.yaml": "model: " + cfg.model_dump_json() + "\n"},
                resume_from=resume, parallel=par,
            )  # fmt: skip
        return getattr(tracker, "peak", 0)

    if phase == "first":
        peaks = {"small": job("ref", 1, 4), "big": job("probe", 2, 2)}
        peaks["budget"] = (peaks["small"] + peaks["big"]) // 2
        if rank == 1:
            (root / "peaks.json").write_text(json.dumps(peaks))
        job("oom", 2, 2, budget=peaks["budget"])  # raises OutOfMemoryStop on rank 1
    else:
        job("oom", 2, 2, resume=root / "oom" / "checkpoints" / "step-000001")
        distributed.teardown(par)


def test_fsdp_oom_stops_with_a_record_and_resume_splits(tmp_path: Path) -> None:
    import json

    with pytest.raises(Exception, match="OutOfMemoryStop") as stopped:
        spawn(_fsdp_oom_jobs, 2, str(tmp_path), "first")
    assert "resume with --resume" in str(stopped.value)
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    assert peaks["big"] > 1.1 * peaks["small"]  # the budget separates the two micro-batches
    record = json.loads((tmp_path / "oom" / "oom" / "rank-1.json").read_text())
    assert (record["step"], record["splits"], record["micro_batch"]) == (2, 2, 1)
    assert (tmp_path / "oom" / "checkpoints" / "latest").read_text().strip() == "step-000001"
    spawn(_fsdp_oom_jobs, 2, str(tmp_path), "resume")  # reads the record: micro-batches of 1
    events = [json.loads(x) for x in (tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["micro_batch"]) for e in events if e.get("oom")] == [(1, 1)]
    assert max(e["step"] for e in events) == STEPS
    # the same data cursor and weights as micro-batch 1 x 4 from the start (step 1 ran as 2 x 2:
    # the same gradient summed in another order, hence the tolerance of this file)
    state = {
        r: load_train_state(tmp_path / r / "checkpoints" / f"step-{STEPS:06d}")
        for r in ("oom", "ref")
    }
    assert state["oom"]["data"] == state["ref"]["data"] and state["oom"]["step"] == STEPS
    assert state["oom"]["oom"]["splits"] == 2  # later checkpoints keep the split
    assert_same_weights(weights(tmp_path / "oom"), weights(tmp_path / "ref"))


def test_rank_rows_split_the_global_batch_and_share_its_state() -> None:
    """finetune/classify/mlm: each rank keeps its block of the global micro-batch (nested
    tuples and dicts of tensors); the ranks' blocks, in rank order, are the global batch."""

    class Source:
        context = 4

        def __init__(self) -> None:
            self.i = 0

        def next_batch(self):
            self.i += 1
            x = torch.arange(8 * 4).reshape(8, 4) + 100 * self.i
            return x, x + 1, {"segments": x % 3}

        def state_dict(self) -> dict:
            return {"i": self.i}

        def load_state_dict(self, state: dict) -> None:
            self.i = state["i"]

    ranks = [
        distributed.RankRows(Source(), distributed.Parallel("ddp", r, 2, r, 2)) for r in (0, 1)
    ]
    whole = Source().next_batch()
    parts = [r.next_batch() for r in ranks]
    assert all(p[0].shape == (4, 4) for p in parts) and ranks[0].context == 4
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1], rtol=0, atol=0)
    segs = torch.cat([p[2]["segments"] for p in parts])
    torch.testing.assert_close(segs, whole[2]["segments"], rtol=0, atol=0)
    assert ranks[1].state_dict() == {"i": 1}
    ranks[1].load_state_dict({"i": 5})
    assert int(ranks[1].next_batch()[0][0, 0]) == 600 + 16  # rank 1's first row of batch 6
