"""GGUF export (interop/gguf_export.py), checked by two consumers: transformers' GGUF loader and
lmforge's own reader load the written file with the source's logits (f32: equal; f16/q8_0/q4_0:
errors in that order) and greedy tokens; the metadata is what llama.cpp needs for a byte-level BPE
vocabulary; the real SmolLM2 GGUF round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.interop.test_gguf import SMOLLM, smollm_dir

from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import CheckpointError
from lmforge.generate import generate_tokens
from lmforge.interop.gguf import load_gguf, unpermute_rows
from lmforge.interop.gguf_export import permute_rows, pre_tokenizer_name, write_gguf
from lmforge.models.decoder import Decoder, DecoderConfig

gguf = pytest.importorskip("gguf", reason="GGUF files are written with the gguf package (dev)")
transformers = pytest.importorskip("transformers", reason="the reference GGUF loader (dev extra)")

TEXT = "The quick brown fox jumps over the lazy dog 1234. " * 20 + "Zwölf 🙂 <|eos|>"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|eos|>{% endfor %}"


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer([TEXT], vocab_size=320)


def tiny(arch: str, tied: bool, vocab: int) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch=arch, vocab_size=vocab, context_length=64, n_layer=2, n_head=4,
        n_kv_head=2 if arch == "llama" else None, d_model=64, tie_embeddings=tied,
    )  # fmt: skip
    model = Decoder(cfg).eval()
    with torch.no_grad():  # peaked logits: greedy ties cannot flip on float-order noise
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def hf_load(path: Path, arch: str) -> Any:
    # transformers 5.24 reads gpt2.context_length into `n_ctx`, which GPT2Config no longer
    # uses: without n_positions its position table is 1024 rows and loading fails.
    extra = {"n_positions": 64} if arch == "gpt2" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()


def test_permute_rows_is_the_inverse_of_the_readers_unpermute() -> None:
    w = torch.randn(4 * 8, 5)
    assert not torch.equal(permute_rows(w, 4), w)
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [False, True])
def test_f32_export_loads_in_transformers_and_lmforge_with_equal_logits_and_tokens(
    arch: str, tied: bool, tok: Any, tmp_path: Path
) -> None:
    model = tiny(arch, tied, tok.get_vocab_size())
    path = write_gguf(model, tok, TEMPLATE, tmp_path / "m.gguf", "f32")
    ours, ours_tok = load_gguf(path)
    ref = hf_load(path, arch)
    ids = torch.randint(
        0, tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        source = model(ids)
        assert torch.equal(ours(ids), source)  # f32 in, f32 out: bit-identical
        torch.testing.assert_close(ref(ids).logits, source, rtol=0, atol=1e-4)
    assert ours.cfg.tie_embeddings is tied and (ours.lm_head.weight is ours.tok_emb.weight) is tied
    prompt = tok.encode("The lazy dog").ids
    want = list(generate_tokens(model, prompt, max_new_tokens=12, temperature=0))
    assert list(generate_tokens(ours, prompt, max_new_tokens=12, temperature=0)) == want
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert theirs[0, len(prompt) :].tolist() == want
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["The lazy dog 1234.", "  Zwölf\t🙂\n<|eos|>x"]:
        assert ref_tok(text)["input_ids"] == tok.encode(text).ids
        assert ours_tok.encode(text).ids == tok.encode(text).ids


def test_quantized_types_cost_accuracy_in_order_and_both_readers_agree(
    tok: Any, tmp_path: Path
) -> None:
    model = tiny("llama", False, tok.get_vocab_size())
    ids = torch.randint(
        0, tok.get_vocab_size(), (1, 24), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        source = model(ids)
    errors, sizes = {}, {}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        path = write_gguf(model, tok, None, tmp_path / f"{kind}.gguf", kind)
        sizes[kind] = path.stat().st_size
        with torch.no_grad():
            ours, ref = load_gguf(path)[0](ids), hf_load(path, "llama")(ids).logits
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # the same dequantization
        errors[kind] = (ours - source).abs().max().item()
    assert errors["f32"] == 0 < errors["f16"] < errors["q8_0"] < errors["q4_0"], errors
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"], sizes
    types = {
        t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q4_0.gguf")).tensors
    }
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_metadata_is_what_llama_cpp_needs_for_byte_level_bpe(tok: Any, tmp_path: Path) -> None:
    path = write_gguf(tiny("llama", True, tok.get_vocab_size()), tok, TEMPLATE, tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert meta["tokenizer.ggml.model"] == "gpt2"  # byte-level BPE, not SentencePiece ("llama")
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the name llama-vocab.cpp maps to GPT-2's regex
    spec_merges = len(tok.to_str().split('"merges"')[1].split("]]")[0].split("],"))
    assert len(meta["tokenizer.ggml.merges"]) == spec_merges > 0
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # control, then normal
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["tokenizer.ggml.padding_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == TEMPLATE
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}  # tied


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(tok: Any, tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # GPT-2 with a prefix
    with pytest.raises(CheckpointError, match="pre-tokenizer .* none llama.cpp knows"):
        pre_tokenizer_name(tok)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert pre_tokenizer_name(tok) == "gpt-2"


def test_models_gguf_cannot_express_are_refused_before_writing(tok: Any, tmp_path: Path) -> None:
    cfg = DecoderConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2,
                        d_model=32, qkv_bias=True)  # fmt: skip  # Qwen2-style biases
    with pytest.raises(CheckpointError, match="GGUF export supports Llama without biases"):
        write_gguf(Decoder(cfg), tok, None, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.slow  # ~100 s on 2 busy cores: dequantizing, writing and reading 135M parameters
def test_real_smollm2_round_trips_through_an_f32_export(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (Q4_1) → lmforge → f32 GGUF → lmforge and transformers: the same
    logits as the model it was written from; the smollm pre-tokenizer and chat template kept."""
    folder = smollm_dir()
    model, tok = load_gguf(folder / SMOLLM)
    template = gguf.GGUFReader(str(folder / SMOLLM)).fields["tokenizer.chat_template"].contents()
    path = write_gguf(model, tok, template, tmp_path / "smollm.gguf", "f32")
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        source = model(ids)
        back, back_tok = load_gguf(path)
        assert torch.equal(back(ids), source)
        del back
        torch.testing.assert_close(hf_load(path, "llama")(ids).logits, source, rtol=0, atol=1e-4)
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.chat_template"] == template
    text = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n"
    assert back_tok.encode(text).ids == tok.encode(text).ids


@pytest.mark.slow  # needs llama.cpp binaries built from source (minutes), see docs/export.md
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_tokenizes_and_generates_as_the_source(
    arch: str, tok: Any, tmp_path: Path
) -> None:
    """llama.cpp itself loads the file (pre-tokenizer recognised, vocabulary accepted), encodes
    text to the source tokenizer's ids and continues a prompt greedily with the same tokens."""
    import os
    import subprocess

    bin_dir = Path(os.environ.get("LLAMA_CPP_BIN", "/nonexistent"))
    if not (bin_dir / "llama-simple").is_file() or not (bin_dir / "llama-tokenize").is_file():
        pytest.skip("set LLAMA_CPP_BIN to a folder with llama.cpp's llama-simple and "
                    "llama-tokenize (cmake --build build --target llama-simple llama-tokenize)")  # fmt: skip
    model = tiny(arch, False, tok.get_vocab_size())
    path = write_gguf(model, tok, TEMPLATE, tmp_path / "m.gguf", "f32")
    text = "The lazy dog 1234. Zwölf 🙂"
    ran = subprocess.run(
        [str(bin_dir / "llama-tokenize"), "-m", str(path), "-p", text, "--ids", "--log-disable"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert json.loads(ran.stdout.strip().splitlines()[-1]) == tok.encode(text).ids
    prompt = "The quick brown fox"
    ids = tok.encode(prompt).ids
    want = list(generate_tokens(model, ids, max_new_tokens=12, temperature=0, eos_id=1))
    out = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(path), "-n", "12", prompt],
                         capture_output=True, timeout=300, check=True).stdout  # fmt: skip
    # bytes, not text: a random model emits byte tokens that are no UTF-8 on their own
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    pieces = b"".join(bytes(byte_of[c] for c in tok.id_to_token(i)) for i in want)
    assert out == prompt.encode() + pieces + b"\n"


def test_qk_norm_models_are_refused_by_hf_and_gguf_export() -> None:
    """No Hugging Face Llama config or llama.cpp graph computes model.qk_norm: refuse, not
    write a file whose logits differ."""
    from lmforge.interop.gguf_export import gguf_arch
    from lmforge.interop.hf import config_to_hf
    from lmforge.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(arch="llama", vocab_size=64, n_layer=1, d_model=32, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        config_to_hf(cfg)
    with pytest.raises(CheckpointError, match="qk_norm"):
        gguf_arch(Decoder(cfg))
