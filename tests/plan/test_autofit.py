"""Auto-fit (``plan/autofit.py``) and ``lmforge estimate`` on fine-tune configs: the global
batch never changes, precision and method change only when allowed and only when needed, a plan
that cannot fit says what it needs and what to allow, ``finetune --train.memory_budget`` applies
the plan; a fine-tune preset's model comes from its base (or --model), its adapters from
lora.targets under lmforge's module names; freeze and DoRA estimates match measured bytes;
the LoRA block's savings are estimated as measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.measure import eager_lora_blocks, second_step_peak
from tests.tiny_checkpoint import write_tiny_decoder

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.plan.autofit import apply_memory_budget, plan_fit, train_workload
from lmforge.plan.estimate import GiB, PeerPractice, Workload, estimate, lora_terms, parse_bytes
from lmforge.train.loop import TrainConfig
from lmforge.train.optim import OptimConfig

GPT2_124M = DecoderConfig(
    arch="gpt2", vocab_size=50257, context_length=1024, n_layer=12, d_model=768, n_head=12
)
# Meta-Llama-3-8B's config.json (the fields lmforge reads)
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip


def test_plan_keeps_global_batch_and_fits_budget() -> None:
    w = Workload(batch=32, seq=1024, precision="bf16-mixed", device="cuda")
    plan = plan_fit(GPT2_124M, w, parse_bytes("24GiB"), global_batch=32)
    assert plan["fits"] and plan["micro_batch"] * plan["grad_accum"] == 32
    assert plan["predicted_peak"] <= 0.95 * 24 * GiB and plan["changes"] == []
    assert not plan_fit(GPT2_124M, w, parse_bytes("1GiB"), global_batch=32)["fits"]


def test_nothing_fits_names_the_smallest_need_and_the_allow_option() -> None:
    cfg = config_from_hf(LLAMA3_8B)
    w = Workload(batch=4, seq=1024, precision="fp32", device="cuda")  # full fine-tune, fp32
    plan = plan_fit(cfg, w, parse_bytes("24GiB"), global_batch=16)
    smallest = min(
        estimate(cfg, Workload(**{**w.__dict__, "batch": 1, "grad_accum": 16, "checkpointing": c}))
        .peak for c in ("full", "selective")
    )  # fmt: skip
    assert not plan["fits"] and plan["needed"] == pytest.approx(smallest + 600 * 2**20)
    assert (
        "nothing fits" in plan["summary"] and f"{plan['needed'] / GiB:.2f} GiB" in plan["summary"]
    )
    assert "--train.memory_allow=[precision,method]" in plan["summary"]
    # what is already allowed is not suggested again; precision alone does not rescue it
    plan = plan_fit(cfg, w, parse_bytes("24GiB"), global_batch=16, allow=["precision"])
    assert not plan["fits"] and "memory_allow=[method]" in plan["summary"]


def test_method_changes_only_when_allowed_and_needed() -> None:
    cfg = config_from_hf(LLAMA3_8B)
    w = Workload(batch=4, seq=1024, precision="bf16", device="cuda", lora_rank=16)
    w = Workload(**{**w.__dict__, "lora_targets": lora_terms(["attn.qkv", "proj"])})
    plan = plan_fit(cfg, w, parse_bytes("24GiB"), global_batch=16, allow=["method"])
    assert plan["fits"] and plan["method"] in ("lora", "qlora") and plan["precision"] == "bf16"
    assert plan["micro_batch"] * plan["grad_accum"] == 16
    [change] = plan["changes"]
    assert (change["field"], change["from"], change["to"]) == ("method", "full", plan["method"])
    assert "nothing fits otherwise" in change["why"] and "changed method" in plan["summary"]
    # a budget the full fine-tune fits: the method stays, allowed or not
    roomy = plan_fit(cfg, w, parse_bytes("200GiB"), global_batch=16, allow=["method"])
    assert roomy["fits"] and roomy["method"] == "full" and roomy["changes"] == []


def test_global_batch_unchanged_and_nothing_changed_unless_allowed() -> None:
    cfg = config_from_hf(LLAMA3_8B)
    w = Workload(batch=8, seq=1024, precision="fp32", device="cuda", method="lora")
    for budget in ("12GiB", "16GiB", "24GiB", "40GiB", "80GiB"):
        for allow in ([], ["precision"], ["method"], ["precision", "method"]):
            plan = plan_fit(cfg, w, parse_bytes(budget), global_batch=24, allow=allow)
            if not plan["fits"]:
                continue
            assert plan["micro_batch"] * plan["grad_accum"] == 24, (budget, allow)
            assert plan["predicted_peak"] <= 0.95 * parse_bytes(budget)
            assert "precision" in allow or plan["precision"] == "fp32"
            assert "method" in allow or plan["method"] == "lora"
            assert {c["field"] for c in plan["changes"]} <= set(allow)


def test_memory_budget_plan_is_applied_and_written(tmp_path: Path) -> None:
    # 32 x 1024 tokens of GPT-2 need ~19 GiB: a 16 GiB budget makes the plan split the batch
    train = TrainConfig(batch_size=32, grad_accum=1, precision="bf16-mixed", memory_budget="16GiB")
    w = train_workload(train, OptimConfig(), 1024, "cuda")
    new, plan = apply_memory_budget(train, w, GPT2_124M, "cuda", tmp_path)
    assert new.batch_size * new.grad_accum == 32 and new.batch_size < 32
    assert json.loads((tmp_path / "memory_plan.json").read_text()) == plan
    assert plan["fits"] and plan["micro_batch"] == new.batch_size
    assert new.activation_checkpointing == plan["activation_checkpointing"]
    # pretraining cannot switch method; a budget nothing fits is a config error naming it
    with pytest.raises(ConfigError, match="'method' applies to lmforge finetune"):
        apply_memory_budget(train.model_copy(update={"memory_allow": ["method"]}), w,
                            GPT2_124M, "cuda", tmp_path)  # fmt: skip
    small = train.model_copy(update={"memory_budget": "1GiB"})
    with pytest.raises(ConfigError, match=r"memory_budget=1GiB: nothing fits .*\[precision\]"):
        apply_memory_budget(small, w, GPT2_124M, "cuda", tmp_path)


def test_lora_terms_map_lmforge_module_names() -> None:
    assert lora_terms(["attn.qkv", "proj", "mlp.gate", "up", "lm_head"]) == (
        "qkv", "o", "down", "gate", "up", "head",
    )  # fmt: skip
    assert lora_terms(["q", "v"]) == ("q", "v")  # other libraries' layouts, as they are
    with pytest.raises(ValueError, match="'attn.q_proj' is neither an lmforge module"):
        lora_terms(["attn.q_proj"])


# ---- finetune --train.memory_budget ------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random lmforge checkpoint folder (weights, config.yaml, tokenizer.json)."""
    pytest.importorskip("peft", reason="LoRA adapters come from peft (the finetune extra)")
    from lmforge.data.instructions import make_suite

    text = "".join(f"{e['prompt']} = {e['answer']}\n" for e in make_suite(["reverse", "sort"], 50))
    out = tmp_path_factory.mktemp("base")
    return write_tiny_decoder(out, text + "<|im_start|>user assistant\n", 300, 96)


FAST = [
    "--train.max_steps=2", "--train.eval_every=2", "--train.log_every=1",
    "--sched.warmup_steps=1", "--n_eval=2", "--max_new_tokens=2", "--suite.n_per_family=12",
    "--train.num_threads=1", "--method=full", "--train.batch_size=4",
]  # fmt: skip


def test_finetune_memory_budget_switches_method_only_when_allowed(
    base: Path, tmp_path: Path, capsys
) -> None:
    # 1.3 MiB: the full fine-tune of the tiny base needs >= 1.38 MiB at micro-batch 1, LoRA less
    args = ["finetune", f"--base={base}", *FAST, "--train.memory_budget=1.3MiB"]
    assert main([*args, f"--out_dir={tmp_path / 'no'}"]) == 2
    err = capsys.readouterr().err
    assert "nothing fits" in err and "MiB" in err and "memory_allow=[precision,method]" in err
    run = tmp_path / "run"
    assert main([*args, f"--out_dir={run}", "--train.memory_allow=[method]"]) == 0
    plan = json.loads((run / "memory_plan.json").read_text())
    assert plan["fits"] and plan["method"] == "lora" and plan["precision"] == "fp32"
    assert plan["micro_batch"] * plan["grad_accum"] == 4
    assert [c["field"] for c in plan["changes"]] == ["method"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["adapter"] and summary["steps"] == 2
    saved = (run / "config.yaml").read_text()  # the values that ran
    assert "method: lora" in saved and f"batch_size: {plan['micro_batch']}" in saved


# ---- lmforge estimate --config <finetune config> -----------------------------------------------


def _estimate(capsys, *args: str) -> dict:
    assert main(["estimate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_a_finetune_preset_with_a_llama3_8b_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = ["--config", "llama3_8b_qlora", f"--model={tmp_path / 'config.json'}"]
    report = _estimate(capsys, *args, "--fit=24GiB")
    w = report["workload"]
    assert (w["method"], w["lora_rank"], w["lora_dropout"]) == ("qlora", 16, 0.05)
    assert w["lora_targets"] == ["qkv", "o", "gate", "up", "down"]  # attn.qkv ... mlp.proj
    assert (w["batch"], w["grad_accum"], w["seq"]) == (8, 4, 1024)
    assert (w["precision"], w["checkpointing"], w["qlora_double_quant"]) == (
        "bf16-mixed", "full", True,
    )  # fmt: skip
    assert report["model"]["n_kv_head"] == 8 and report["model"]["vocab_size"] == 128256
    plan = report["plan"]
    assert plan["fits"] and plan["micro_batch"] * plan["grad_accum"] == 32
    # what the estimate says equals the estimator on the same workload
    cfg = config_from_hf(LLAMA3_8B)
    wl = Workload(**{**w, "lora_targets": tuple(w["lora_targets"])})
    assert report["estimate"]["peak"] == estimate(cfg, wl).peak
    # command-line values override the config's; a full fp32 fine-tune does not fit, and the
    # plan says so until method changes are allowed
    full = ["--method=full", "--precision=fp32", "--fit=24GiB"]
    assert not _estimate(capsys, *args, *full)["plan"]["fits"]
    plan = _estimate(capsys, *args, *full, "--memory_allow=[method]")["plan"]
    assert plan["fits"] and plan["method"] in ("lora", "qlora")


def test_estimate_finetune_config_reads_its_base_or_names_the_key(
    base: Path, tmp_path: Path, capsys
) -> None:
    preset = ["--config", "llama3_8b_lora"]
    assert main(["estimate", *preset]) == 2
    err = capsys.readouterr().err
    assert "base='models/Meta-Llama-3-8B-Instruct' does not exist" in err and "--model" in err
    report = _estimate(capsys, *preset, f"--base={base}")  # an lmforge checkpoint
    assert report["model"]["d_model"] == 32 and report["workload"]["method"] == "lora"
    # a run's saved fine-tune config (top-level base/method/lora) is recognised as one
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(f"base: {base}\nmethod: freeze\nlora:\n  train_blocks: 1\n")
    w = _estimate(capsys, "--config", str(cfg_file))["workload"]
    assert (w["method"], w["train_blocks"], w["seq"]) == ("freeze", 1, 96)


def test_estimate_reads_a_gguf_base_without_its_tensors(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gguf", reason="GGUF files are read with the gguf package")
    pytest.importorskip("transformers", reason="the tiny GGUF is written from a transformers model")
    from tests.interop.test_gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    hf_model, _ = write_tiny_gguf(path, tied=False)
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(f"base: {path}\nmethod: qlora\n")
    report = _estimate(capsys, "--config", str(cfg_file))
    hf = hf_model.config
    assert report["model"]["n_layer"] == hf.num_hidden_layers
    assert report["model"]["d_model"] == hf.hidden_size
    assert report["model"]["vocab_size"] == hf.vocab_size


# ---- freeze and DoRA: predicted vs measured live tensors ---------------------------------------


@pytest.mark.parametrize(
    "method,lora",
    [("freeze", dict(train_blocks=1)), ("freeze", dict(train_blocks=2, train_norms=False)),
     ("dora", dict(targets=["attn.qkv", "proj"]))],
)  # fmt: skip
def test_freeze_and_dora_estimates_match_measured(method: str, lora: dict) -> None:
    pytest.importorskip("peft", reason="DoRA comes from peft")
    from lmforge.models.lora import LoraConfig, prepare_model

    cfg = DecoderConfig(
        arch="llama", vocab_size=512, context_length=64, n_layer=4, n_head=4, n_kv_head=2,
        d_model=128,
    )  # fmt: skip
    torch.manual_seed(0)
    lc = LoraConfig(rank=8, **lora)
    peak = second_step_peak(prepare_model(Decoder(cfg), method, lc), 4, 64)
    w = Workload(
        batch=4, seq=64, method=method, lora_rank=8, lora_targets=lora_terms(lc.targets),
        train_blocks=lc.train_blocks, train_norms=lc.train_norms,
    )  # fmt: skip
    est = estimate(cfg, w)
    assert est.all_components["optimizer states"] == pytest.approx(peak["Optstate"], abs=256)
    assert est.peak == pytest.approx(peak["Total"], rel=0.08)


def test_a_budget_that_is_not_a_size_names_the_flag_and_the_accepted_forms(tmp_path: Path) -> None:
    """``estimate --fit=lots`` (and ``train.memory_budget: lots``) is a usage error (exit 2)
    that names where the budget came from and what to write instead, not a ValueError."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "lmforge", "estimate", "--fit=lots"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    message = run.stderr.strip()
    assert "--fit=lots" in message and "24GiB" in message and "auto" in message
    assert "Traceback" not in message and "ValueError" not in message
    train = TrainConfig(memory_budget="lots")
    w = train_workload(train, OptimConfig(), 64, "cpu")
    cfg = DecoderConfig(arch="llama", vocab_size=64, n_layer=1, d_model=32, context_length=64)
    with pytest.raises(ConfigError, match=r"train\.memory_budget=lots: .*80GB"):
        apply_memory_budget(train, w, cfg, "cpu", tmp_path)
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


def test_lean_lora_blocks_save_what_the_estimate_says() -> None:
    """lmforge's LoRA blocks rebuild their norm outputs and form the SwiGLU product inside the
    down adapter (``PeerPractice.lean_lora_blocks``): the estimate drops what the measured peak
    drops, to one norm output (block 0's first norm keeps its input instead)."""
    pytest.importorskip("peft", reason="LoRA comes from peft")
    from lmforge.models.lora import LoraConfig, prepare_model

    cfg = DecoderConfig(
        arch="llama", vocab_size=512, context_length=64, n_layer=4, n_head=4, n_kv_head=2,
        d_model=128,
    )  # fmt: skip
    lc = LoraConfig(rank=8)  # every linear of the blocks, the down projection too

    def measured(lean: bool) -> int:
        torch.manual_seed(0)
        model = prepare_model(Decoder(cfg), "lora", lc)
        return second_step_peak(model if lean else eager_lora_blocks(model), 4, 64)["Total"]

    w = Workload(batch=4, seq=64, method="lora", lora_rank=8, lora_targets=lora_terms(lc.targets))
    lean_estimate = estimate(cfg, w).peak
    plain_estimate = estimate(cfg, w, PeerPractice(lean_lora_blocks=False)).peak
    one_norm_output = 4 * 64 * cfg.d_model * 4
    saved_measured = measured(False) - measured(True)
    assert saved_measured > 0.25 * lean_estimate  # 4.1 of 14.0 MB here
    assert plain_estimate - lean_estimate == pytest.approx(
        saved_measured + one_norm_output, rel=0.02
    )
