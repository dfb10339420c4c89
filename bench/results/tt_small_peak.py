"""Run a checkout's bench/train_throughput.py for its bf16 rows on a CPU without native bf16.

    python bench/results/tt_small_peak.py CHECKOUT/bench/train_throughput.py --steps 2 --rounds 2

Used on 2026-12-03 to compare make bench's bf16 rows before and after the restructure on an
AVX2-only host. Two changes, neither touching the ratios: the bf16 matmul peak probe is 256²
(emulated bf16 made the 1024² probe take minutes; only the MFU column uses it) and the
torch.compile row is left out (its emulated-bf16 compile takes minutes).
"""

import sys
import time
from pathlib import Path

import torch

script = Path(sys.argv[1])
sys.argv = [str(script), *sys.argv[2:]]
sys.path.insert(0, str(script.parent))  # that checkout's bench helpers (and, through them, its src)
import train_throughput  # noqa: E402


def small_peaks(n: int, repeats: int, bf16_n: int | None = None) -> dict[str, float]:
    peaks = {}
    for key, dtype, size in [("fp32", torch.float32, n), ("bf16", torch.bfloat16, 256)]:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        times = []
        for _ in range(repeats + 1):  # the first call picks the kernel: not counted
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        peaks[key] = 2 * size**3 / min(times[1:])
    return peaks


train_throughput.matmul_peaks = small_peaks
train_throughput.OURS = [row for row in train_throughput.OURS if not row[2]]  # no compile row
train_throughput.main()
