"""Predicted vs measured peak memory of real training steps on this CPU.

For each configuration: build the model, run one warm-up step (the optimizer creates its
states), then measure the second step's peak of live tensor bytes with
``lmforge.plan.tracker`` (MemTracker; bytes, not time, so CPU load does not matter) and
compare with ``lmforge.plan.estimate.estimate``. The accelerate-style figure (weights,
gradients and Adam states only: 4 x the weights, what ``accelerate estimate-memory`` prints for
training) stands beside it.

    PYTHONPATH=src python bench/memory_accuracy.py [--json out.json] [--quick]

Prints one row per configuration, the per-component comparison, and the median / max
absolute error of the totals. Also checks once that MemTracker agrees with
``torch.profiler(profile_memory=True)`` on a GPT step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.plan.estimate import Estimate, Workload, estimate
from lmforge.plan.tracker import track_peak
from lmforge.train.loop import accumulate_gradients
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.precision import weight_dtype

CPU = torch.device("cpu")
LORA_TARGETS = {"qkv": "attn.qkv", "o": "attn.proj", "gate": "mlp.gate", "up": "mlp.up"}
LORA_TARGETS |= {"down": "mlp.proj", "fc": "mlp.fc"}


BASE = dict(arch="gpt2", L=2, d=128, nh=4, nkv=None, V=2048, B=4, T=64, prec="fp32")
BASE |= dict(ac="none", opt="adamw", ga=1, drop=0.0, method="full", targets=())


def configs() -> list[dict]:
    """≥ 24 configurations across size, batch, sequence, precision, checkpointing (none,
    selective, full), optimizer, family, GQA, dropout, accumulation and LoRA."""
    base = BASE
    rows = [
        {},
        dict(B=8),
        dict(T=128),
        dict(L=4, d=256, nh=8),
        dict(V=8192),
        dict(V=256, d=256),
        dict(prec="bf16-mixed"),
        dict(prec="bf16"),
        dict(ac="full"),
        dict(ac="full", prec="bf16-mixed", B=8),
        dict(opt="sgd"),
        dict(opt="adam", ga=2),
        dict(ga=4, B=2),
        dict(drop=0.1),
        dict(arch="llama", nkv=2),
        dict(arch="llama", nkv=4),
        dict(arch="llama", nkv=1, T=128),
        dict(arch="llama", nkv=2, prec="bf16-mixed"),
        dict(arch="llama", nkv=2, prec="bf16"),
        dict(arch="llama", nkv=2, ac="full"),
        dict(arch="llama", nkv=2, ac="full", prec="bf16-mixed", L=4),
        dict(arch="llama", nkv=2, opt="sgd", B=8, T=32),
        dict(arch="llama", nkv=2, drop=0.1, prec="bf16-mixed"),
        dict(arch="llama", nkv=2, L=4, d=256, nh=8, V=4096, prec="bf16-mixed"),
        dict(arch="llama", nkv=2, ga=2, prec="bf16-mixed"),
        dict(arch="gpt2", L=6, d=384, nh=6, V=8192, T=128, B=2, prec="bf16-mixed"),
    ]
    try:
        import peft  # noqa: F401

        rows += [
            dict(arch="llama", nkv=2, method="lora", targets=("qkv", "o")),
            dict(arch="llama", nkv=2, method="lora", targets=("qkv", "o", "gate", "up", "down")),
            dict(arch="llama", nkv=2, method="lora", targets=("qkv",), prec="bf16-mixed"),
            dict(arch="gpt2", method="lora", targets=("qkv", "fc", "down")),
        ]
    except ImportError:
        print("peft is not installed: LoRA rows skipped", file=sys.stderr)
    # selective checkpointing (after the LoRA rows so that earlier row numbers stay); from
    # "d=256 V=256" on, small vocabularies: activations, not logits, decide the peak, and
    # none / selective / full stand side by side (with row 6 for gpt2 none)
    small = dict(arch="llama", nkv=2, d=256, V=256, T=128)
    rows += [
        dict(ac="selective"),
        dict(ac="selective", prec="bf16-mixed", B=8),
        dict(ac="selective", drop=0.1),
        dict(arch="llama", nkv=2, ac="selective"),
        dict(arch="llama", nkv=2, ac="selective", prec="bf16-mixed", L=4),
        dict(arch="llama", nkv=2, ac="selective", prec="bf16"),
        dict(ac="selective", d=256, V=256),
        dict(ac="full", d=256, V=256),
        small,
        small | dict(ac="selective"),
        small | dict(ac="full"),
    ]
    return [base | r for r in rows]


def build(c: dict) -> tuple[DecoderConfig, Decoder]:
    cfg = DecoderConfig(
        arch=c["arch"], vocab_size=c["V"], context_length=c["T"], n_layer=c["L"],
        n_head=c["nh"], n_kv_head=c["nkv"], d_model=c["d"], dropout=c["drop"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(cfg).to(dtype=weight_dtype(c["prec"]))
    model.activation_checkpointing = c["ac"]
    if c["method"] == "lora":
        from lmforge.models.lora import LoraConfig, prepare_model

        targets = [LORA_TARGETS[t] for t in c["targets"]]
        model = prepare_model(model, "lora", LoraConfig(rank=8, targets=targets))
    return cfg, model


def measure(c: dict) -> dict[str, int]:
    cfg, model = build(c)
    model.train()
    opt = build_optimizer(model, OptimConfig(name=c["opt"]))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        micro = [
            (torch.randint(0, c["V"], (c["B"], c["T"])), torch.randint(0, c["V"], (c["B"], c["T"])))
            for _ in range(c["ga"])
        ]
        accumulate_gradients(model, micro, c["prec"], CPU)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states appear in the first step
    with track_peak(model, opt) as peak:
        step()
    return peak


def workload(c: dict) -> Workload:
    return Workload(
        batch=c["B"], seq=c["T"], grad_accum=c["ga"], precision=c["prec"], optimizer=c["opt"],
        method=c["method"], lora_targets=tuple(c["targets"]) or ("q", "v"),
        checkpointing=c["ac"], device="cpu",
    )  # fmt: skip


def accelerate_figure(est: Estimate) -> float:
    """What ``accelerate estimate-memory`` prints for training with Adam: 4 x the weights'
    bytes (weights, gradients and two optimizer states; no activations, no logits) — the
    peer's way, beside lmforge's own estimate."""
    return 4 * est.all_components.get("weights", 0)


def predicted_by_category(est: Estimate) -> dict[str, float]:
    """The estimate's live components grouped as MemTracker categorises tensors."""
    out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "activations+temps": 0.0}
    for k, v in est.components.items():
        if k in ("weights", "lora adapters"):
            out["weights"] += v
        elif k.startswith("gradients"):
            out["gradients"] += v
        elif k == "optimizer states":
            out["optimizer"] += v
        else:
            out["activations+temps"] += v
    return out


def profiler_check() -> tuple[int, int]:
    """MemTracker's peak vs torch.profiler(profile_memory=True)'s, for one GPT fp32 step."""
    c = configs()[0]
    cfg, model = build(c)
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    x, y = torch.randint(0, c["V"], (c["B"], c["T"])), torch.randint(0, c["V"], (c["B"], c["T"]))

    def step() -> None:
        accumulate_gradients(model, [(x, y)], "fp32", CPU)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with track_peak(model, opt) as peak:
        step()
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    base += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # replay every allocation and free in time order (each op's own bytes, not its children's):
    # the running sum's maximum is the profiler's peak of live tensors. An op's own frees are
    # placed at its end (autograd's evaluate_function frees the saved tensors after its
    # children allocated the input gradient), its own allocations at its start.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
    )
    running = top = 0
    for e in events:
        running += e.self_cpu_memory_usage
        top = max(top, running)
    return peak["Total"], base + top


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--quick", action="store_true", help="first 6 configurations only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    cs = configs()[:6] if args.quick else configs()
    t0 = time.time()
    head = f"{'#':>2} {'configuration (vs gpt2 L=2 d=128 nh=4 V=2048 B=4 T=64 fp32 adamw)':<66} {'measured':>10} {'predicted':>10} {'err':>7} {'accel.':>9}"
    print(head)
    for i, c in enumerate(cs):
        meas = measure(c)
        cfg, _ = build(c)
        est = estimate(cfg, workload(c))
        err = est.peak / meas["Total"] - 1
        accel = accelerate_figure(est)
        desc = (
            c["arch"]
            + " "
            + " ".join(
                f"{k}={v}" for k, v in c.items() if k not in ("arch", "targets") and v != BASE[k]
            )
        )
        desc += f" lora={'+'.join(c['targets'])}" if c["method"] == "lora" else ""
        print(
            f"{i + 1:>2} {desc:<66.66} {meas['Total'] / 2**20:>8.2f}Mi {est.peak / 2**20:>8.2f}Mi "
            f"{err:>+7.1%} {accel / 2**20:>7.2f}Mi"
        )
        m_cat = {
            "weights": meas["Parameter"] + meas["Buffer"],
            "gradients": meas["Gradient"],
            "optimizer": meas["Optstate"],
            "activations+temps": meas["Activation"] + meas["Temp"] + meas["Other"],
        }
        p_cat = predicted_by_category(est)
        print(
            "     "
            + "  ".join(f"{k} {m_cat[k] / 2**20:.2f}/{p_cat[k] / 2**20:.2f}" for k in m_cat)
            + f"  (measured/predicted MiB; peak at {est.phase})"
        )
        rows.append(dict(config=c, measured=meas, predicted=est.peak, error=err, accelerate=accel,
                         predicted_components=est.components, phase=est.phase))  # fmt: skip
    errs = [abs(r["error"]) for r in rows]
    accel_errs = [abs(r["accelerate"] / r["measured"]["Total"] - 1) for r in rows]
    print(
        f"\n{len(rows)} configurations: median |error| {statistics.median(errs):.1%}, "
        f"max {max(errs):.1%}; accelerate-style figure: median {statistics.median(accel_errs):.1%}, "
        f"max {max(accel_errs):.1%}  ({time.time() - t0:.0f} s, torch {torch.__version__})"
    )
    tracker, profiler = profiler_check()
    print(
        f"MemTracker vs torch.profiler(profile_memory=True) on a GPT step: {tracker:,} vs {profiler:,} B"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0 if max(errs) <= 0.10 and statistics.median(errs) <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
