"""Hugging Face interop: tiny random transformers models load with equal logits and greedy
tokens; lmforge models export to folders transformers loads with equal logits; bad folders fail
with errors that name the file or key. Everything is built offline from config objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.checkpoint.load import load
from lmforge.checkpoint.store import find_checkpoint
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import CheckpointError
from lmforge.generate import generate_tokens
from lmforge.interop.hf import config_from_hf, export_hf, load_hf
from lmforge.models.decoder import Decoder, DecoderConfig

transformers = pytest.importorskip(
    "transformers", reason="parity tests compare against transformers (the dev extra)"
)

V, ATOL = 96, 1e-4
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    # no EOS: both generators must run all 10 steps
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    initializer_range=0.1,  # peaked logits: greedy ties cannot flip on rounding
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 16 positions: the head's wavelengths (6 … 2e4) fall in all three bands of the scaling
    "original_max_position_embeddings": 16,
}


def hf_config(case: str) -> Any:
    if case == "gpt2":
        return transformers.GPT2Config(
            vocab_size=V,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            initializer_range=0.1,
        )
    if case == "llama-gqa-untied":
        return transformers.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    if case == "llama3-rope-scaling":
        return transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_scaling=LLAMA3)
    if case == "qwen2-bias-tied":
        return transformers.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if case == "mistral":  # its default sliding window (4096) exceeds the context: not in use
        return transformers.MistralConfig(**COMMON, num_key_value_heads=1)
    raise AssertionError(case)


CASES = ["gpt2", "llama-gqa-untied", "llama3-rope-scaling", "qwen2-bias-tied", "mistral"]


def save_hf(case: str, folder: Path, **save_kw: Any) -> Any:
    """A seeded random transformers model of ``case``, saved to ``folder``; returns it (eval)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(case)).eval()
    with torch.no_grad():  # HF initialises biases to 0, which would hide a misplaced bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder, **save_kw)
    return model


def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", CASES)
def test_load_hf_matches_transformers_logits_and_greedy_tokens(case: str, tmp_path: Path) -> None:
    ref = save_hf(case, tmp_path)
    ours, tokenizer = load_hf(tmp_path)
    ours.eval()
    assert tokenizer is None  # no tokenizer.json saved
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(ref, ids), rtol=0, atol=ATOL)

    prompt = ids[:1, :5]
    theirs = ref.generate(prompt, max_new_tokens=10, do_sample=False)[0, 5:].tolist()
    mine = list(generate_tokens(ours, prompt, max_new_tokens=10, temperature=0, eos_id=None))
    assert mine == theirs and len(mine) == 10


def test_llama3_rope_scaling_is_applied(tmp_path: Path) -> None:
    """Dropping the scaling changes the logits: the parity above is not vacuous."""
    ref = save_hf("llama3-rope-scaling", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(cfg).rope_scaling is not None
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": None}))
    unscaled, _ = load_hf(tmp_path)
    ids = torch.randint(0, V, (1, 60), generator=torch.Generator().manual_seed(2))
    gap = (logits_of(unscaled.eval(), ids) - logits_of(ref, ids)).abs().max()
    assert gap > 1e-2


def test_original_gpt2_file_layout_loads(tmp_path: Path) -> None:
    """The hub's gpt2 files name tensors without "transformer." and store causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    ref = save_hf("gpt2", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old_style = {k.removeprefix("transformer."): v for k, v in weights.items()}
    old_style["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(old_style, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_hf(tmp_path)
    ids = torch.randint(0, V, (1, 16))
    torch.testing.assert_close(logits_of(ours.eval(), ids), logits_of(ref, ids), rtol=0, atol=ATOL)


def test_sharded_checkpoint_loads_identically(tmp_path: Path) -> None:
    save_hf("llama-gqa-untied", tmp_path / "one")
    save_hf("llama-gqa-untied", tmp_path / "many", max_shard_size="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    a, _ = load_hf(tmp_path / "one")
    b, _ = load_hf(tmp_path / "many")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_tokenizer():
    text = "The quick brown fox jumps over the lazy dog. " * 20 + "Zwölf Boxkämpfer 🙂 jagen."
    return train_tokenizer([text], vocab_size=300)


def tiny_lmforge(arch: str, vocab: int, **extra: Any) -> Decoder:
    kw: dict[str, Any] = dict(vocab_size=vocab, context_length=64, n_layer=2, n_head=4, d_model=64)
    if arch == "llama":
        kw |= dict(n_kv_head=2, rope_theta=500000.0, norm_eps=1e-6)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(arch=arch, **kw, **extra)).eval()
    with torch.no_grad():  # trained models have non-trivial norms and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def resolved(cfg: DecoderConfig) -> dict[str, Any]:
    """The architecture a config builds: null fields resolved, training-only fields left out."""
    out = cfg.model_dump(exclude={"arch", "init", "dropout"})
    return out | {"d_ff": cfg.ff_width, "n_kv_head": cfg.kv_heads}


EXPORTS = {
    "gpt2": ("gpt2", {}, "GPT2LMHeadModel"),
    "llama": ("llama", {}, "LlamaForCausalLM"),
    "llama-tied-rope-scaling": (
        "llama",
        dict(
            tie_embeddings=True,
            rope_scaling=dict(
                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=16
            ),
        ),
        "LlamaForCausalLM",
    ),
    "qwen2": ("llama", dict(qkv_bias=True), "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_loads_in_transformers_with_equal_logits(case: str, tmp_path: Path) -> None:
    arch, extra, hf_class = EXPORTS[case]
    tok = tiny_tokenizer()
    model = tiny_lmforge(arch, tok.get_vocab_size(), **extra)
    out = export_hf(model, tok, tmp_path / "export")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == hf_class
    ids = torch.randint(
        0, tok.get_vocab_size(), (2, 30), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(logits_of(ref, ids), logits_of(model, ids), rtol=0, atol=ATOL)

    # ... and comes back to lmforge bit-identical
    back, back_tok = load_hf(out)
    assert resolved(back.cfg) == resolved(model.cfg)
    assert all(torch.equal(p, model.state_dict()[k]) for k, p in back.state_dict().items())
    assert back_tok is not None and back_tok.to_str() == tok.to_str()


def test_exported_tokenizer_round_trips_in_transformers(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    out = export_hf(tiny_lmforge("gpt2", tok.get_vocab_size()), tok, tmp_path / "export")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    for text in ["The lazy fox.", "  Zwölf\tBoxkämpfer 🙂\n\nneu", "über 中文"]:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf_tok.decode(ids) == text


def test_export_refuses_what_hugging_face_cannot_express(tmp_path: Path) -> None:
    cfg = DecoderConfig(arch="gpt2", mlp="swiglu", vocab_size=V, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ValueError, match="mlp=swiglu"):
        export_hf(Decoder(cfg), None, tmp_path / "x")
    no_bias = DecoderConfig(arch="gpt2", bias=False, vocab_size=V, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ValueError, match="bias"):
        export_hf(Decoder(no_bias), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(tiny_lmforge("gpt2", V), None, tmp_path / "x")


def test_missing_files_and_unsupported_configs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config("mistral").to_dict()))
    with pytest.raises(CheckpointError, match=r"model.safetensors .*missing"):
        load_hf(tmp_path)

    base = hf_config("llama-gqa-untied").to_dict()
    bad = {
        "model_type='bert'.*supported: gpt2, llama, mistral, qwen2": {"model_type": "bert"},
        "rope_scaling.rope_type='yarn'.*supported: default, llama3": {
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
        },
        "head_dim=8": {"head_dim": 8},
        "hidden_act='gelu'": {"hidden_act": "gelu"},
    }
    for message, change in bad.items():
        with pytest.raises(CheckpointError, match=message):
            config_from_hf({**base, **change})
    window = {**hf_config("mistral").to_dict(), "sliding_window": 16}
    with pytest.raises(CheckpointError, match="sliding_window=16"):
        config_from_hf(window)


def test_tensors_the_config_does_not_declare_are_an_error(tmp_path: Path) -> None:
    """A bias the config says nothing about must not be dropped silently."""
    save_hf("qwen2-bias-tied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"no place for.*q_proj.bias"):
        load_hf(tmp_path)


def test_hf_folder_is_accepted_wherever_a_checkpoint_is(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_lmforge("llama", tok.get_vocab_size())
    out = export_hf(model, tok, tmp_path / "export")
    assert find_checkpoint(out) == out
    loaded, loaded_tok, ckpt = load(out, torch.device("cpu"), expect="decoder")
    ckpt = ckpt.path
    assert ckpt == out and not loaded.training and loaded_tok.to_str() == tok.to_str()
    ids = torch.randint(0, tok.get_vocab_size(), (1, 12))
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_cli_export_of_an_lmforge_checkpoint(tmp_path: Path) -> None:
    import yaml

    from lmforge.checkpoint.store import save_checkpoint
    from lmforge.cli import main

    tok = tiny_tokenizer()
    model = tiny_lmforge("gpt2", tok.get_vocab_size())
    files = {
        "config.yaml": yaml.safe_dump({"model": model.cfg.model_dump(mode="json")}),
        "tokenizer.json": tok.to_str(),
    }
    ckpt = save_checkpoint(tmp_path / "run", 1, model, None, files)
    argv = ["export", f"--checkpoint={tmp_path / 'run'}", "--format=hf"]
    assert main([*argv, f"--out_dir={tmp_path / 'hf'}"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tok.get_vocab_size(), (1, 20))
    torch.testing.assert_close(logits_of(ref, ids), logits_of(model, ids), rtol=0, atol=ATOL)
    assert ckpt.name == "step-000001"
    assert main([*argv, "--format=tflite", f"--out_dir={tmp_path / 'o'}"]) == 2  # unknown


def test_declared_special_tokens_are_read_as_transformers_reads_them(tmp_path: Path) -> None:
    """special_tokens_map.json over tokenizer_config.json (strings or AddedToken objects), then
    generation_config.json over config.json ids; a declared token the vocab lacks is skipped;
    transformers agrees on the tokenizer's part."""
    from tokenizers import Tokenizer, models

    from lmforge.interop.hf import declared_special_tokens

    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<s>", "</s>", "<eos>", "<pad>", "<unk>"])  # ids 0..4
    write = lambda name, d: (tmp_path / name).write_text(json.dumps(d))  # noqa: E731
    write("config.json", {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 4})
    assert declared_special_tokens(tmp_path, tok) == {"bos": 1, "eos": 1, "pad": 4}
    write("generation_config.json", {"bos_token_id": 0, "eos_token_id": [2, 1]})
    assert declared_special_tokens(tmp_path, tok) == {"bos": 0, "eos": 2, "pad": 4}
    eos = {"content": "</s>", "special": True, "__type": "AddedToken"}
    write(
        "tokenizer_config.json", {"bos_token": "<missing>", "eos_token": eos, "pad_token": "<pad>"}
    )
    assert declared_special_tokens(tmp_path, tok) == {"bos": 0, "eos": 1, "pad": 3}
    write("special_tokens_map.json", {"bos_token": "<eos>", "eos_token": "<eos>"})
    assert declared_special_tokens(tmp_path, tok) == {"bos": 2, "eos": 2, "pad": 3}
    tok.save(str(tmp_path / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<eos>", "<eos>", "<pad>")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        declared_special_tokens(tmp_path, tok)
