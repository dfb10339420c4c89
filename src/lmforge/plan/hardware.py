"""Time and hardware: FLOPs per token, and for each named GPU whether a workload fits, on how
many devices (ZeRO-3), and how long a step and a run take at an assumed (or measured) MFU."""

from __future__ import annotations

from dataclasses import replace

from lmforge.models.decoder import DecoderConfig
from lmforge.plan.estimate import GiB, estimate
from lmforge.plan.params import count_params
from lmforge.plan.workload import LMFORGE_PRACTICE, PeerPractice, Workload
from lmforge.train.device import GPU_PEAK_FLOPS

# name: (memory bytes, dense bf16 FLOP/s, dense fp32 FLOP/s); FLOP/s from train/device.py
GPUS: dict[str, tuple[int, float, float]] = {
    "RTX 4090": (24 * GiB, *GPU_PEAK_FLOPS["RTX 4090"]),
    "A100 40GB": (40 * GiB, *GPU_PEAK_FLOPS["A100"]),
    "A100 80GB": (80 * GiB, *GPU_PEAK_FLOPS["A100"]),
    "H100 80GB": (80 * GiB, *GPU_PEAK_FLOPS["H100"]),
    "H200 141GB": (141 * 10**9, *GPU_PEAK_FLOPS["H200"]),
}
DEFAULT_MFU = 0.40  # assumed model FLOPs utilisation when none was measured
# The caching allocator rounds blocks and fragments: reserved / allocated is ~1.05-1.15 in
# training; a GPU "fits" when the peak leaves this fraction of its memory free.
ALLOCATOR_SLACK = 0.05
DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # tried in order for "devices needed"


def flops_per_token(cfg: DecoderConfig, seq: int, checkpointing: str = "none") -> float:
    """Training FLOPs per token, 6N + 12·L·T·d (as ``Decoder.flops_per_token``); full
    checkpointing recomputes the forward: 8N + 16·L·T·d. Selective keeps the matmul and
    attention outputs and recomputes only pointwise ops, O(d) FLOPs per token against the
    matmuls' O(d²), so it is counted as 1x (no matmul FLOPs are repeated)."""
    counts = count_params(cfg)
    matmul_params = counts.n_layer * counts.linear_per_layer + (cfg.vocab_size or 0) * cfg.d_model
    flops = 6.0 * matmul_params + 12.0 * cfg.n_layer * seq * cfg.d_model
    return flops * 4 / 3 if checkpointing == "full" else flops


def devices_needed(
    cfg: DecoderConfig, w: Workload, memory: float, peer: PeerPractice = LMFORGE_PRACTICE
) -> int | None:
    """The fewest devices of ``memory`` bytes (ZeRO-3 over more than one) the workload fits
    on, leaving ``ALLOCATOR_SLACK`` free; None beyond 64."""
    for n in DEVICE_COUNTS:
        on_n = replace(w, device="cuda", world_size=n, sharding="zero3" if n > 1 else "none")
        est = estimate(cfg, on_n, peer)
        if est.peak + est.runtime_overhead <= memory * (1 - ALLOCATOR_SLACK):
            return n
    return None


def hardware_table(
    cfg: DecoderConfig,
    w: Workload,
    tokens: float | None = None,
    mfu: float = DEFAULT_MFU,
    peer: PeerPractice = LMFORGE_PRACTICE,
) -> list[dict]:
    """For each named GPU: does it fit, how many devices (ZeRO-3) it takes, time per step and
    (given a token budget) per run, in seconds and hours."""
    rows = []
    step_tokens = w.batch * w.seq * w.grad_accum * max(1, w.world_size)
    step_flops = flops_per_token(cfg, w.seq, w.checkpointing) * step_tokens
    for name, (memory, bf16_flops, fp32_flops) in GPUS.items():
        n = devices_needed(cfg, w, memory, peer)
        speed = (bf16_flops if w.precision != "fp32" else fp32_flops) * mfu  # FLOP/s achieved
        row = dict(gpu=name, memory_gib=memory / GiB, fits_one=n == 1, devices_needed=n)
        row["step_s"] = step_flops / speed / max(1, w.world_size)
        if tokens:
            row["run_h"] = tokens * step_flops / step_tokens / (speed * (n or 1)) / 3600
        rows.append(row)
    return rows
