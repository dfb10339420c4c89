"""Run a checkout's bench/train_throughput.py with the bf16 peak probe at 256^2 (emulated bf16
on AVX2 makes the 1024^2 probe take minutes; only the MFU column depends on it)."""
import sys, time, runpy, torch
bench = sys.argv[1]; sys.argv = [bench, *sys.argv[2:]]
sys.path.insert(0, bench.rsplit("/", 1)[0])
import train_throughput as T
def peaks(n, repeats, bf16_n=None):
    out = {}
    for key, dtype, size in [("fp32", torch.float32, n), ("bf16", torch.bfloat16, 256)]:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        ts = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
        out[key] = 2 * size**3 / min(ts[1:])
    return out
T.matmul_peaks = peaks
T.OURS = [o for o in T.OURS if not o[2]]  # no torch.compile row: its emulated-bf16 compile takes minutes
T.main()
