"""Memory planner: estimate vs measured live tensors, public GPU figures, auto-fit, OOM recovery."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.measure import second_step_peak

from lmforge.cli import main
from lmforge.data.loader import TokenBatches
from lmforge.interop.hf import config_from_hf
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.plan.estimate import GiB, PeerPractice, Workload, count_params, estimate
from lmforge.plan.tracker import BudgetTracker, LiveTensorTracker
from lmforge.plan.workload import LMFORGE_PRACTICE
from lmforge.train.loop import TrainConfig, fit, split_micro_batches
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig, build_optimizer

CPU = torch.device("cpu")


def _measured_step(cfg: DecoderConfig, precision: str, B: int, T: int, ac: str = "none") -> int:
    torch.manual_seed(0)
    model = Decoder(cfg).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    model.activation_checkpointing = ac
    return second_step_peak(model, B, T, precision)["Total"]


@pytest.mark.parametrize(
    "arch,precision,ac",
    [("gpt2", "fp32", "none"), ("gpt2", "bf16-mixed", "full"), ("llama", "bf16-mixed", "none"),
     ("llama", "fp32", "full"), ("llama", "bf16", "none"), ("gpt2", "fp32", "selective"),
     ("llama", "bf16-mixed", "selective")],
)  # fmt: skip
def test_estimate_matches_measured_live_tensors(arch: str, precision: str, ac: str) -> None:
    cfg = DecoderConfig(
        arch=arch, vocab_size=1024, context_length=32, n_layer=2, n_head=4,
        n_kv_head=2 if arch == "llama" else None, d_model=64,
    )  # fmt: skip
    measured = _measured_step(cfg, precision, 4, 32, ac)
    w = Workload(batch=4, seq=32, precision=precision, checkpointing=ac)
    predicted = estimate(cfg, w).peak
    assert predicted == pytest.approx(measured, rel=0.05)


def test_param_count_equals_model() -> None:
    for cfg in (
        DecoderConfig(arch="gpt2", vocab_size=100, n_layer=2, d_model=64),
        DecoderConfig(arch="llama", vocab_size=100, n_layer=2, d_model=64, n_kv_head=2),
    ):
        assert count_params(cfg).total == Decoder(cfg).num_params()


def test_frozen_parameters_do_not_break_the_tracker() -> None:
    model = Decoder(DecoderConfig(arch="llama", vocab_size=64, n_layer=1, d_model=32))
    for name, p in model.named_parameters():
        p.requires_grad = "blocks.0.mlp" in name
    tracker = LiveTensorTracker()
    tracker.track_external(model)
    with tracker:
        model(torch.randint(0, 64, (2, 8))).sum().backward()
    assert tracker.peak_bytes() > 0


# Public GPU measurements; settings from the sources (docs/memory.md lists them).
L2_7B = dict(
    model_type="llama", vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_size=4096, intermediate_size=11008,
)  # fmt: skip
L2_13B = L2_7B | dict(
    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, hidden_size=5120,
    intermediate_size=13824,
)  # fmt: skip
L31_8B = L2_7B | dict(
    vocab_size=128256, max_position_embeddings=131072, num_key_value_heads=8,
    intermediate_size=14336, rope_theta=500000.0,
)  # fmt: skip
LIT = dict(seq=1304, precision="bf16", device="cuda", lora_rank=8, lora_targets=("q", "v"))
LITGPT = PeerPractice(
    loss_chunks=11,  # litgpt lm_head_chunk_size=128 over the longest Alpaca sample
    loss_upcast=True,  # its loss upcasts each chunk's logits to fp32
    logits_in_backward=True,  # its finetune loop holds the logits through backward
    lean_lora_blocks=False,  # its LoRA blocks keep norm outputs and the SwiGLU product
)
LITGPT_QLORA = replace(LITGPT, quantize_head=True)  # its bnb plugin quantises the head too
TT = dict(batch=2, seq=2048, precision="bf16", device="cuda", checkpointing="full")
TORCHTUNE = PeerPractice(
    loss_chunks=8,
    loss_fused=True,  # CEWithChunkedOutputLoss, compiled
    loss_upcast=True,  # each chunk upcast to fp32 for F.cross_entropy
    lean_lora_blocks=False,
)  # logits_in_backward=False (the default): its recipes `del logits` before calling backward
TT_LORA = ("q", "v", "o", "gate", "up", "down")
PUBLIC = [  # (name, HF config, workload, the peer's loop practice, reported bytes)
    ("litgpt Llama-2-7B LoRA mb1 A100", L2_7B, Workload(batch=1, method="lora", **LIT), LITGPT,
     21.30e9),
    ("litgpt Llama-2-7B LoRA mb2 A100", L2_7B, Workload(batch=2, method="lora", **LIT), LITGPT,
     29.07e9),
    ("litgpt Llama-2-7B QLoRA nf4 A100", L2_7B, Workload(batch=1, method="qlora", **LIT),
     LITGPT_QLORA, 14.14e9),
    ("litgpt Llama-2-7B QLoRA nf4-dq A100", L2_7B,
     Workload(batch=1, method="qlora", qlora_double_quant=True, **LIT), LITGPT_QLORA, 13.84e9),
    ("litgpt Llama-2-7B inference A100", L2_7B,
     Workload(batch=1, seq=100, precision="bf16", device="cuda", inference=True),
     LMFORGE_PRACTICE, 13.52e9),
    ("litgpt Llama-2-13B inference A100", L2_13B,
     Workload(batch=1, seq=100, precision="bf16", device="cuda", inference=True),
     LMFORGE_PRACTICE, 26.21e9),
    ("torchtune Llama-3.1-8B full 4090", L31_8B, Workload(optimizer="adamw8bit", **TT),
     replace(TORCHTUNE, paged_optimizer=True, optimizer_in_backward=True), 18.9 * GiB),
    ("torchtune Llama-3.1-8B LoRA 4090", L31_8B,
     Workload(method="lora", lora_targets=TT_LORA, **TT), TORCHTUNE, 16.2 * GiB),
    ("torchtune Llama-3.1-8B QLoRA 4090", L31_8B,
     Workload(method="qlora", qlora_double_quant=True, lora_targets=TT_LORA, **TT), TORCHTUNE,
     7.4 * GiB),
]  # fmt: skip


@pytest.mark.parametrize("name,hf,workload,peer,reported", PUBLIC, ids=[p[0] for p in PUBLIC])
def test_public_gpu_measurements_within_15_percent(name, hf, workload, peer, reported) -> None:
    cfg = config_from_hf(hf)
    assert estimate(cfg, workload, peer).peak == pytest.approx(reported, rel=0.15)


def test_gqa_shrinks_the_kv_cache() -> None:
    mha = config_from_hf(L2_7B)
    gqa = config_from_hf(L2_7B | dict(num_key_value_heads=8))
    w = Workload(batch=4, seq=4096, precision="bf16", device="cuda", inference=True)
    kv = [estimate(c, w).components["KV cache"] for c in (mha, gqa)]
    assert kv[0] == 4 * kv[1] == 2 * 32 * 4 * 4096 * 4096 * 2


def test_zero_sharding_and_lora_reduce_memory() -> None:
    cfg = config_from_hf(L2_7B)
    base = Workload(batch=1, seq=2048, precision="bf16-mixed", device="cuda")
    full = estimate(cfg, base).peak
    z3 = estimate(cfg, Workload(**{**base.__dict__, "world_size": 8, "sharding": "zero3"})).peak
    lora = estimate(cfg, Workload(**{**base.__dict__, "method": "lora"})).peak
    assert z3 < lora < full


def test_cli_estimate_json_for_a_hugging_face_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(L2_7B))
    args = ["estimate", f"--model={tmp_path}", "--method=qlora", "--precision=bf16", "--json"]
    assert main([*args, "--fit=24GiB", "--tokens=1e9"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["estimate"]["peak"] > 3 * GiB
    assert {r["gpu"] for r in report["hardware"]} >= {"RTX 4090", "A100 40GB", "H100 80GB"}
    assert report["plan"]["fits"]


# ---- OOM recovery ----------------------------------------------------------------------------


def _tokens(n: int = 6000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 512, n).astype(np.uint16)


class _Recording(TokenBatches):
    def next_batch(self):  # type: ignore[override]
        x, y = super().next_batch()
        self.seen = getattr(self, "seen", []) + [x]
        return x, y


def _fit(
    tmp: Path,
    batch: int,
    accum: int,
    budget: int | None = None,
    track: bool = False,
    eval_batch: int | None = None,
):
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=512,
        context_length=16,
        n_layer=2,
        n_head=2,
        d_model=32,
        dropout=0.1,
    )
    model = Decoder(cfg)
    # plain SGD has no state, so every step peaks alike and the first one already overflows
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=3e-2, momentum=0.0))
    batches = _Recording(_tokens(), 16, batch, seed=0)
    train = TrainConfig(
        max_steps=3, batch_size=batch, grad_accum=accum, eval_every=2 if eval_batch else 100,
        save_every=100, log_every=1, device="cpu", eval_batch_size=eval_batch,
    )  # fmt: skip
    # the budget counts tensors created during fit (optimizer states, activations, gradients)
    tracker = BudgetTracker(budget or 2**62) if budget or track else contextlib.nullcontext()
    args = dict(peak_lr=3e-3, sched=SchedConfig(warmup_steps=0), run_dir=tmp, device=CPU,
                checkpoint_files={"config.yaml": "x: 1\n"})  # fmt: skip
    if eval_batch:
        args["val_tokens"] = np.random.default_rng(1).integers(0, 512, 2000).astype(np.uint16)
    with tracker:
        result = fit(model, opt, batches, train, **args)
    return model, batches, result, getattr(tracker, "peak", 0)


def test_oom_recovery_loses_nothing(tmp_path: Path) -> None:
    _, _, _, small_peak = _fit(tmp_path / "probe-small", 4, 2, track=True)
    _, _, _, big_peak = _fit(tmp_path / "probe-big", 8, 1, track=True)
    assert big_peak > small_peak * 1.1  # the budget below separates the two
    budget = (small_peak + big_peak) // 2
    oom_model, oom_data, oom_result, _ = _fit(tmp_path / "oom", 8, 1, budget=budget)
    ref_model, ref_data, ref_result, _ = _fit(tmp_path / "ref", 4, 2)
    assert oom_result.step == ref_result.step == 3
    # the same samples, in the same order, and the data cursor at the same place
    assert torch.equal(torch.cat(oom_data.seen), torch.cat(ref_data.seen))
    assert oom_data.state_dict() == ref_data.state_dict()
    for a, b in zip(oom_model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    events = [
        json.loads(line) for line in (tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(e["step"], e["micro_batch"]) for e in events if e.get("oom") == "split"] == [(1, 4)]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_oom_shrinks_only_the_eval_batch(tmp_path: Path) -> None:
    # evaluations at steps 2 and 3; training (micro-batch 2 x 2) peaks below eval with 64 rows
    _, _, _, small_peak = _fit(tmp_path / "probe-small", 2, 2, track=True, eval_batch=16)
    _, _, _, big_peak = _fit(tmp_path / "probe-big", 2, 2, track=True, eval_batch=64)
    assert big_peak > small_peak * 1.3
    budget = (small_peak + big_peak) // 2
    oom_model, oom_data, oom_result, _ = _fit(tmp_path / "oom", 2, 2, budget, eval_batch=64)
    events = _events(tmp_path / "oom")
    shrunk = [e["eval_batch_size"] for e in events if e.get("oom") == "eval"]
    assert shrunk and shrunk[0] < 64 and not [e for e in events if e.get("oom") == "split"]
    final = shrunk[-1]
    ref_model, ref_data, ref_result, _ = _fit(tmp_path / "ref", 2, 2, eval_batch=final)
    assert oom_result.step == ref_result.step == 3
    # the same val loss as evaluating with the smaller batch from the start, at both evals
    val = [
        [e["val_loss"] for e in _events(tmp_path / r) if "val_loss" in e] for r in ("oom", "ref")
    ]
    assert len(val[0]) == 2 and val[0] == val[1]
    # training untouched: same micro-batches, same samples, same weights (train mode restored)
    assert torch.equal(torch.cat(oom_data.seen), torch.cat(ref_data.seen))
    assert all(x.size(0) == 2 for x in oom_data.seen)
    for a, b in zip(oom_model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_split_micro_batches_keeps_rows_in_order() -> None:
    x = torch.arange(12).view(6, 2)
    parts = split_micro_batches([(x, x + 100), (x + 1000, x)], 2)
    assert [p[0][:, 0].tolist() for p in parts] == [
        [0, 2, 4],
        [6, 8, 10],
        [1000, 1002, 1004],
        [1006, 1008, 1010],
    ]
    with pytest.raises(torch.OutOfMemoryError):
        split_micro_batches([(x[:1], x[:1])], 2)


TINY_HF = dict(
    model_type="llama", vocab_size=256, max_position_embeddings=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
)  # fmt: skip


def test_estimate_calibrate_measures_mfu(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    args = ["estimate", f"--model={tmp_path}", "--precision=fp32", "--batch_size=2", "--json"]
    assert main([*args, "--calibrate", "--calibrate_steps=3", "--tokens=1e6"]) == 0
    report = json.loads(capsys.readouterr().out)
    cal = report["calibration"]
    assert 0 < cal["mfu"] <= 1 and report["mfu"] == cal["mfu"] and cal["device"] == "cpu"
    assert report["mfu_source"] == "measured" and cal["steps"] == 3 and cal["tokens_per_s"] > 0
    # the time columns use the measured MFU: step time scales as 1 / MFU
    assert main(args) == 0
    assumed = json.loads(capsys.readouterr().out)
    assert assumed["mfu_source"] == "assumed" and "calibration" not in assumed
    for a, m in zip(assumed["hardware"], report["hardware"], strict=True):
        assert m["step_s"] == pytest.approx(a["step_s"] * assumed["mfu"] / cal["mfu"])
