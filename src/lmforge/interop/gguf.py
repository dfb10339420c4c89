"""GGUF files (llama.cpp) in: the Llama family and GPT-2, dequantized to a plain Decoder.

GGUF tensors are renamed to Hugging Face names with one explicit dict per family (``NAMES``) and
then loaded with ``interop/hf.py``'s key map of that family, so both paths share one mapping;
the writer (``gguf_export.py``) reads the same dicts backwards, so the two cannot drift.
llama.cpp's converter permutes the query/key rows of every Llama head (its RoPE pairs adjacent
dimensions, Hugging Face's rotate-half pairs dimension i with i + hd/2); ``unpermute_rows``
undoes that exactly as transformers' GGUF loader does. GPT-2's Conv1D weights are stored
transposed to (out, in) (convert_hf_to_gguf's GPT2Model). Quantized tensors are dequantized
with ``gguf.quants``, one tensor at a time, so peak memory is about one copy of the model.

The tokenizer is rebuilt from the GGUF metadata for byte-level BPE vocabularies
(``tokenizer.ggml.model = gpt2``) whose pre-tokenizer is known (``PRE_TOKENIZERS``); for any
other, ``load_gguf`` returns None as the tokenizer and logs why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from lmforge.config import validate_config
from lmforge.data.tokenizer import declare_special_tokens
from lmforge.errors import CheckpointError
from lmforge.interop.hf import empty_decoder, fill_decoder, gpt2_key_map, llama_key_map
from lmforge.models.decoder import Decoder, DecoderConfig

log = logging.getLogger(__name__)

# GGUF name → Hugging Face name, per family (llama.cpp's gguf-py/gguf/tensor_mapping.py, reversed)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GPT2_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
GPT2_BLOCK_MODULES = {  # GGUF module → (GPT-2 module, a Conv1D: stored transposed in GGUF)
    "attn_norm": ("ln_1", False),
    "attn_qkv": ("attn.c_attn", True),
    "attn_output": ("attn.c_proj", True),
    "ffn_norm": ("ln_2", False),
    "ffn_up": ("mlp.c_fc", True),
    "ffn_down": ("mlp.c_proj", True),
}
GPT2_BLOCK_NAMES = {
    f"{g}.{leaf}": f"{h}.{leaf}"
    for g, (h, _) in GPT2_BLOCK_MODULES.items()
    for leaf in ("weight", "bias")
}
# general.architecture → (global names, block names, Hugging Face block prefix)
NAMES = {
    "llama": (GLOBAL_NAMES, BLOCK_NAMES, "model.layers"),
    "gpt2": (GPT2_GLOBAL_NAMES, GPT2_BLOCK_NAMES, "transformer.h"),
}
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# tokenizer.ggml.pre → pre-tokenizer, as llama.cpp's llama-vocab.cpp splits text for that type
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS: dict[str, pre_tokenizers.PreTokenizer] = {
    "gpt-2": _GPT2_SPLIT,  # the name llama.cpp knows (LLAMA_VOCAB_PRE_TYPE_GPT2)
    "gpt2": _GPT2_SPLIT,  # what older lmforge tests wrote; llama.cpp rejects it
    # SmolLM: every digit alone, then GPT-2's regex
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), _GPT2_SPLIT]
    ),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: (n_head·hd, d) with each head's rows ordered
    (pair, 2) → ordered (2, pair), the rotate-half layout. Inverse of convert_hf_to_gguf's
    ``permute``; same as transformers' ``_reverse_permute_weights``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _fields(reader: Any) -> dict[str, Any]:
    """GGUF metadata as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> DecoderConfig:
    """GGUF metadata (``llama.*`` or ``gpt2.*`` keys) → DecoderConfig; errors name the key."""
    arch = meta.get("general.architecture")
    if arch not in NAMES:
        raise CheckpointError(
            f"{source}: general.architecture={arch!r} is not supported (supported: "
            f"{', '.join(NAMES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: metadata key {arch}.{key} is missing")
        return value

    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    d, nh = get("embedding_length"), get("attention.head_count")
    fields = dict(
        vocab_size=vocab or get("vocab_size"),
        context_length=get("context_length"),
        n_layer=get("block_count"),
        n_head=nh,
        d_model=d,
        d_ff=get("feed_forward_length"),
        dropout=0.0,
        tie_embeddings="output.weight" not in tensor_names,  # llama.cpp drops a tied head
    )
    if arch == "gpt2":
        fields |= dict(arch="gpt2", bias=True, norm_eps=get("attention.layer_norm_epsilon"))
        return validate_config(DecoderConfig, fields, source)
    if get("rope.dimension_count", d // nh) != d // nh:
        raise CheckpointError(
            f"{source}: llama.rope.dimension_count={meta['llama.rope.dimension_count']} is not "
            f"supported (lmforge rotates the whole head: {d // nh})"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            f"{source}: RoPE scaling (llama.rope.scaling.type={scaling!r} or a rope_freqs "
            "tensor) is not supported for GGUF yet; load the Hugging Face checkpoint instead"
        )
    fields |= dict(
        arch="llama",
        n_kv_head=get("attention.head_count_kv", nh),
        bias=False,
        qkv_bias=False,
        norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
    )
    return validate_config(DecoderConfig, fields, source)


def hf_name(arch: str, name: str) -> str:
    """GGUF tensor name → Hugging Face name (unknown names pass through, to be reported)."""
    global_names, block_names, prefix = NAMES[arch]
    if name in global_names:
        return global_names[name]
    m = BLOCK.match(name)
    if m and m.group(2) in block_names:
        return f"{prefix}.{m.group(1)}.{block_names[m.group(2)]}"
    return name


def is_conv1d(arch: str, gguf_name: str) -> bool:
    """Is this a GPT-2 Conv1D weight, stored (out, in) in GGUF and (in, out) by Hugging Face?"""
    m = BLOCK.match(gguf_name)
    module, _, leaf = m.group(2).rpartition(".") if m else ("", "", "")
    return arch == "gpt2" and leaf == "weight" and GPT2_BLOCK_MODULES.get(module, ("", False))[1]


def _read_tensors(reader: Any, arch: str, cfg: DecoderConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor in its layout) per GGUF tensor, dequantized one at a
    time."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)  # numpy, torch order (rows, cols)
        w = torch.from_numpy(w if w.flags.writeable else w.copy()).float()
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, cfg.n_head)
        elif arch == "llama" and t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, cfg.kv_heads)
        elif is_conv1d(arch, t.name):
            w = w.T
        yield hf_name(arch, t.name), w


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer | None:
    """A ``tokenizers`` Tokenizer from GGUF metadata, or None when lmforge cannot build it."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS or "tokenizer.ggml.merges" not in meta:
        log.warning(
            "GGUF tokenizer (tokenizer.ggml.model=%r, pre=%r) cannot be rebuilt; supported: "
            "model gpt2 with pre %s",
            kind,
            pre,
            ", ".join(PRE_TOKENIZERS),
        )
        return None
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> …) match whole and are special; user-defined ones match whole.
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == USER_DEFINED
        ]
    )
    # The special tokens llama.cpp uses: the one lmforge uses too (data/tokenizer.special_tokens)
    roles = {"bos": "bos", "eos": "eos", "pad": "padding"}
    keys = {k: f"tokenizer.ggml.{n}_token_id" for k, n in roles.items()}
    ids = {k: int(meta[key]) for k, key in keys.items() if key in meta}
    declare_special_tokens(tok, {k: i for k, i in ids.items() if 0 <= i < len(tokens)})
    return tok


def _reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(
            "loading .gguf files needs the gguf package: pip install 'gguf>=0.19,<1'"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return GGUFReader(str(path))  # memory-maps the file: tensors are read only when used
    except (ValueError, OSError) as e:  # bad magic or truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def gguf_config(path: str | Path) -> DecoderConfig:
    """The DecoderConfig of a ``.gguf`` file from its metadata alone (``lmforge estimate``)."""
    reader = _reader(Path(path))
    return config_from_gguf(_fields(reader), {t.name for t in reader.tensors}, str(path))


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[Decoder, Tokenizer | None]:
    """A Llama-family or GPT-2 ``.gguf`` file → (Decoder on the CPU, tokenizer or None),
    dequantized."""
    path = Path(path)
    reader = _reader(path)
    meta = _fields(reader)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors}, str(path))
    arch = meta["general.architecture"]
    key_map = (llama_key_map if arch == "llama" else gpt2_key_map)(cfg)
    tensors = _read_tensors(reader, arch, cfg)
    model = fill_decoder(empty_decoder(cfg), key_map, tensors, str(path), "cpu", dtype)
    return model, tokenizer_from_gguf(meta)
