"""GGUF files (llama.cpp, Ollama) out: Llama-family and GPT-2 decoders, f32 / f16 / q8_0 / q4_0.

Written with the ``gguf`` package's ``GGUFWriter`` (llama.cpp's own Python writer). Tensors
go lmforge → Hugging Face names and layouts (``hf.hf_state_dict``, the key maps every HF
conversion uses) → GGUF names (``gguf.NAMES`` read backwards, the dicts the reader uses), with
llama.cpp's layout changes: Llama q/k rows permuted for its RoPE (``permute_rows``, inverse of
the reader's ``unpermute_rows``), GPT-2 Conv1D weights transposed to (out, in).

The tokenizer goes into the metadata as llama.cpp expects a byte-level BPE vocabulary:
``tokenizer.ggml.model = gpt2`` (llama.cpp's name for byte-level BPE; ``llama`` would mean
SentencePiece), every token by id, the merges, token types (control for special added tokens,
user-defined for other added tokens), BOS/EOS/PAD ids, ``add_bos_token = false`` (lmforge never
prepends BOS) and the chat template. ``tokenizer.ggml.pre`` names how text is split before the
merges; it must be a name llama.cpp's ``llama-vocab.cpp`` knows or it refuses the file ("BPE
pre-tokenizer was not recognized"). lmforge's own tokenizer splits with GPT-2's regex and no
prefix space — exactly llama.cpp's ``gpt-2`` (LLAMA_VOCAB_PRE_TYPE_GPT2, the same regex);
SmolLM's splits every digit first (``smollm``). ``pre_tokenizer_name`` finds the name by
comparing the tokenizer's pre-tokenizer with the ones the reader builds for each name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer, models

from lmforge.data.tokenizer import special_token_ids
from lmforge.errors import CheckpointError
from lmforge.interop.gguf import CONTROL, NAMES, PRE_TOKENIZERS, USER_DEFINED, is_conv1d
from lmforge.interop.hf import hf_model_type, hf_state_dict
from lmforge.models.decoder import Decoder

log = logging.getLogger(__name__)

GgufType = Literal["f32", "f16", "q8_0", "q4_0"]
NORMAL = 1  # tokenizer.ggml.token_type of an ordinary vocabulary entry
LLAMA_CPP_PRE = ("gpt-2", "smollm")  # reader names llama.cpp knows, in order of preference
QUANT_BLOCK = 32  # values per q8_0 / q4_0 block: a quantized row must be a multiple of it


def gguf_arch(model: Decoder) -> str:
    """``general.architecture`` for ``model``: llama or gpt2; CheckpointError says why not."""
    cfg = model.cfg
    try:
        kind = hf_model_type(cfg)
    except ValueError as e:
        raise CheckpointError(f"GGUF export: {e}") from None
    if cfg.qk_norm:
        raise CheckpointError("GGUF export: llama.cpp's llama/gpt2 graphs have no model.qk_norm")
    if kind == "llama" and not (cfg.bias or cfg.qkv_bias or cfg.mlp_bias):
        if cfg.rope_scaling is not None:
            raise CheckpointError(
                "GGUF export: model.rope_scaling (Llama 3.1) is not written yet; export with "
                "--format hf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
        return "llama"
    if kind == "gpt2":
        return "gpt2"
    raise CheckpointError(
        f"GGUF export supports Llama without biases and GPT-2; this model is {kind} with "
        f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, mlp_bias={cfg.mlp_bias}; export with "
        "--format hf instead"
    )


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows → llama.cpp's interleaved pairs: (n_head·hd, d),
    each head's rows ordered (2, pair) → (pair, 2). convert_hf_to_gguf's ``permute``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: Decoder, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor of ``model``."""
    global_names, block_names, prefix = NAMES[arch]
    to_gguf = {hf: g for g, hf in global_names.items()}
    cfg = model.cfg
    for name, tensor in hf_state_dict(model).items():
        if name.startswith(prefix + "."):
            i, rest = name.removeprefix(prefix + ".").split(".", 1)
            local = next((g for g, hf in block_names.items() if hf == rest), None)
            gname = f"blk.{i}.{local}" if local else name
        else:
            gname = to_gguf.get(name, name)
        assert gname != name, f"no GGUF name for {name}"  # the maps cover every family tensor
        w = tensor.detach().float().cpu()
        if arch == "llama" and gname.endswith("attn_q.weight"):
            w = permute_rows(w, cfg.n_head)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            w = permute_rows(w, cfg.kv_heads)
        elif is_conv1d(arch, gname):
            w = w.T
        yield gname, np.ascontiguousarray(w.numpy())


def _without_offsets(spec: Any) -> Any:
    """A serialized pre-tokenizer without ``trim_offsets`` (offsets only, not the split)."""
    if isinstance(spec, dict):
        return {k: _without_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_without_offsets(v) for v in spec]
    return spec


def _pre_spec(pre: Any) -> Any:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return _without_offsets(json.loads(tok.to_str())["pre_tokenizer"])


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` llama.cpp splits text with as ``tokenizer`` does, or
    CheckpointError naming what the tokenizer is (a file llama.cpp would refuse or mis-split)."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, _without_offsets(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise CheckpointError(
            f"GGUF export: the tokenizer is not a byte-level BPE (model {model.get('type')!r}, "
            f"normalizer {spec.get('normalizer')!r}); lmforge writes tokenizer.ggml.model=gpt2 only"
        )
    for name in LLAMA_CPP_PRE:
        if pre == _pre_spec(PRE_TOKENIZERS[name]):
            return name
    raise CheckpointError(
        f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is none llama.cpp "
        f"knows from lmforge's list ({', '.join(LLAMA_CPP_PRE)}); llama.cpp would stop with "
        "'BPE pre-tokenizer was not recognized'. Export with --format hf instead"
    )


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """tokens (by id), merges, token types and the pre-tokenizer name for the GGUF metadata."""
    pre = pre_tokenizer_name(tokenizer)
    spec = json.loads(tokenizer.to_str())
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size or (by_id and max(by_id) >= vocab_size):
        raise CheckpointError(
            f"GGUF export: the tokenizer has {len(by_id)} tokens (max id {max(by_id)}) but the "
            f"model's vocab_size is {vocab_size}"
        )
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces still need a row name
        tokens.append(by_id.get(i, f"<|unused_{i}|>"))
        a = added.get(i)
        kind = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
        types.append(kind if i in by_id else 5)  # 5: UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    return dict(pre=pre, tokens=tokens, types=types, merges=merges)


def _quantized(name: str, w: np.ndarray, gguf_type: GgufType) -> tuple[np.ndarray, Any]:
    """(data, raw dtype or None) for one tensor. 1-D tensors (norms, biases) stay f32, as
    llama.cpp's converter keeps them; a row not a multiple of the block size falls back to f16;
    GPT-2's position table stays f32 (it is added, not multiplied)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if gguf_type == "f32" or w.ndim == 1 or name == "position_embd.weight":
        return w.astype(np.float32), None
    if gguf_type == "f16" or w.shape[-1] % QUANT_BLOCK:
        if gguf_type != "f16":
            log.info("%s: rows of %d values are not whole %s blocks; written as f16", name,
                     w.shape[-1], gguf_type)  # fmt: skip
        return w.astype(np.float16), None
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[gguf_type]
    return quantize(w, qtype), qtype


def write_gguf(
    model: Decoder,
    tokenizer: Tokenizer,
    chat_template: str | None,
    path: Path,
    gguf_type: GgufType = "f16",
    name: str = "lmforge",
) -> Path:
    """Write ``model`` with its tokenizer and chat template to the ``.gguf`` file ``path``."""
    import gguf

    arch = gguf_arch(model)
    cfg = model.cfg
    assert cfg.vocab_size is not None
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size)
    file_types = dict(f32=gguf.LlamaFileType.ALL_F32, f16=gguf.LlamaFileType.MOSTLY_F16,
                      q8_0=gguf.LlamaFileType.MOSTLY_Q8_0, q4_0=gguf.LlamaFileType.MOSTLY_Q4_0)  # fmt: skip
    quiet = logging.getLogger("gguf")  # "for Little Endian only", "Writing the following files"
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_file_type(file_types[gguf_type])
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ff_width)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.d_model // cfg.n_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for role, i in special_token_ids(tokenizer).items():
        getattr(w, f"add_{role}_token_id")(i)
    w.add_add_bos_token(False)  # lmforge's prompts carry no BOS; llama.cpp must not add one
    if chat_template:
        w.add_chat_template(chat_template)
    for gname, array in gguf_tensors(model, arch):
        data, raw = _quantized(gname, array, gguf_type)
        w.add_tensor(gname, data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    finally:
        quiet.setLevel(level)
    return path
