"""Hugging Face checkpoints in and out (gpt2, llama, mistral, qwen2): explicit maps per family.

Tensor names map with a plain dict ``{lmforge tensor: Source}`` (one Hugging Face tensor each,
except the fused attention projection, whose rows are ``[q; k; v]``), config.json keys with
another. The same maps load (``load_hf``, ``interop/gguf.py``) and export (``export_hf``).
Loading builds the model on the meta device and fills it while reading shard by shard, so peak
memory is about one copy of the model. Nothing is executed and no pickle is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.checkpoint.manifest import read_json_object
from lmforge.config import validate_config
from lmforge.data.tokenizer import declare_special_tokens, load_tokenizer, special_token_ids
from lmforge.errors import CheckpointError
from lmforge.interop.key_map import KeyMap, Source, export_by_key_map
from lmforge.interop.safetensors_folder import read_tensors, weight_files, write_hf_folder
from lmforge.models.decoder import Decoder, DecoderConfig, RopeScaling
from lmforge.models.layers import RotaryEmbedding

# lmforge module in a block → (GPT-2 module, is a Conv1D). c_attn is already fused [q; k; v].
GPT2_BLOCK = {
    "norm1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.proj": ("attn.c_proj", True),
    "norm2": ("ln_2", False),
    "mlp.fc": ("mlp.c_fc", True),
    "mlp.proj": ("mlp.c_proj", True),
}
# lmforge Linear in a block → Llama module (q/k/v are separate there: see llama_key_map)
LLAMA_LINEARS = {
    "attn.proj": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.proj": "mlp.down_proj",
}


def gpt2_key_map(cfg: DecoderConfig) -> KeyMap:
    """lmforge tensor names → GPT2LMHeadModel's (every GPT-2 layer has a bias)."""
    km = {"tok_emb.weight": Source(("transformer.wte.weight",))}
    km["pos_emb.weight"] = Source(("transformer.wpe.weight",))
    for leaf in ("weight", "bias"):
        km[f"norm_f.{leaf}"] = Source((f"transformer.ln_f.{leaf}",))
        for i in range(cfg.n_layer):
            for ours, (theirs, conv1d) in GPT2_BLOCK.items():
                name = f"transformer.h.{i}.{theirs}.{leaf}"
                km[f"blocks.{i}.{ours}.{leaf}"] = Source((name,), (), conv1d and leaf == "weight")
    if not cfg.tie_embeddings:
        km["lm_head.weight"] = Source(("lm_head.weight",))
    return km


def llama_key_map(cfg: DecoderConfig) -> KeyMap:
    """lmforge tensor names → Llama/Mistral/Qwen2's; q/k/v projections fuse into ``qkv``."""
    hd = cfg.d_model // cfg.n_head
    rows = (cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd)
    km = {"tok_emb.weight": Source(("model.embed_tokens.weight",))}
    km["norm_f.weight"] = Source(("model.norm.weight",))
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        km[ours + "norm1.weight"] = Source((hf + "input_layernorm.weight",))
        km[ours + "norm2.weight"] = Source((hf + "post_attention_layernorm.weight",))
        for leaf in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            qkv = tuple(f"{hf}self_attn.{p}_proj.{leaf}" for p in "qkv")
            km[f"{ours}attn.qkv.{leaf}"] = Source(qkv, rows)
        for a, b in LLAMA_LINEARS.items():
            has_bias = cfg.mlp_bias if a.startswith("mlp.") else cfg.bias
            for leaf in ("weight", "bias") if has_bias else ("weight",):
                km[f"{ours}{a}.{leaf}"] = Source((f"{hf}{b}.{leaf}",))
    if not cfg.tie_embeddings:
        km["lm_head.weight"] = Source(("lm_head.weight",))
    return km


# ---- config.json ↔ DecoderConfig -----------------------------------------------------------------

# DecoderConfig field ↔ config.json key of (GPT-2, Llama); read by config_from_hf, written by
# config_to_hf. Fields without a key are fixed per family (``_gpt2_fields``, ``_llama_fields``).
CONFIG_KEYS = {
    "vocab_size": ("vocab_size", "vocab_size"),
    "context_length": ("n_positions", "max_position_embeddings"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_kv_head": (None, "num_key_value_heads"),
    "d_model": ("n_embd", "hidden_size"),
    "d_ff": ("n_inner", "intermediate_size"),
    "norm_eps": ("layer_norm_epsilon", "rms_norm_eps"),
    "tie_embeddings": ("tie_word_embeddings", "tie_word_embeddings"),
}
GPT2_KEYS = {hf: ours for ours, (hf, _) in CONFIG_KEYS.items() if hf}
LLAMA_KEYS = {hf: ours for ours, (_, hf) in CONFIG_KEYS.items()}
# transformers' defaults for keys a config.json may leave out (None: lmforge's rule agrees)
GPT2_DEFAULTS = dict(n_positions=1024, n_inner=None, layer_norm_epsilon=1e-5)
LLAMA_DEFAULTS = dict(max_position_embeddings=2048, num_key_value_heads=None, rms_norm_eps=1e-6)
GPT2_DEFAULTS["tie_word_embeddings"], LLAMA_DEFAULTS["tie_word_embeddings"] = True, False
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
# Files that declare special tokens, the one transformers prefers first
TOKENIZER_DECLARATIONS = ("special_tokens_map.json", "tokenizer_config.json")  # token strings
MODEL_DECLARATIONS = ("generation_config.json", "config.json")  # token ids


def _unsupported(src: str, key: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(f"{src}: {key}={value!r} is not supported by lmforge ({supported})")


def _gpt2_fields(hf: dict[str, Any], src: str) -> dict[str, Any]:
    """DecoderConfig fields GPT-2 fixes; a GPT-2 variant lmforge cannot compute is an error."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are GELU's tanh approximation
        raise _unsupported(src, "activation_function", act, "supported: gelu_new")
    fixed = dict(scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    for key, ok in (fixed | dict(scale_attn_weights=True)).items():
        if hf.get(key, ok) != ok:
            raise _unsupported(src, key, hf[key], f"supported: {str(ok).lower()}")
    return dict(arch="gpt2", bias=True)


def _rope(hf: dict[str, Any], src: str) -> dict[str, Any]:
    """RoPE base and scaling from transformers ≥ 5 (``rope_parameters``) or 4 (``rope_scaling``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if any(isinstance(v, dict) for v in scaling.values()):
        raise _unsupported(src, "rope_parameters", scaling, "one RoPE for all layers")
    if (partial := scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(src, "partial_rotary_factor", partial, "supported: 1.0")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind != "llama3":
        raise _unsupported(src, "rope_scaling.rope_type", kind, "supported: default, llama3")
    original = scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    params = {k: scaling[k] for k in LLAMA3_KEYS} | dict(original_context_length=original)
    return dict(rope_theta=theta, rope_scaling=RopeScaling(**params))


def _llama_fields(hf: dict[str, Any], src: str) -> dict[str, Any]:
    """Llama 2/3, Mistral and Qwen2 share one layout; they differ in biases and sliding window."""
    kind, d, nh = hf["model_type"], hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // nh):
        raise _unsupported(src, "head_dim", hf["head_dim"], f"supported: hidden/heads = {d // nh}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(src, "hidden_act", hf["hidden_act"], "supported: silu")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if (kind == "mistral" or hf.get("use_sliding_window")) and window and window < context:
        raise _unsupported(src, "sliding_window", window, "only ≥ max_position_embeddings")
    if kind == "qwen2":  # Qwen2 always has q/k/v biases and no other; its config has no flag
        return dict(arch="llama", bias=False, qkv_bias=True, mlp_bias=False, **_rope(hf, src))
    # attention_bias: q, k, v and o; mlp_bias: gate, up and down (transformers' defaults: False)
    attn, mlp = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    for key, value in (("attention_bias", attn), ("mlp_bias", mlp)):
        if not isinstance(value, bool):
            raise _unsupported(src, key, value, "must be true or false")
    return dict(arch="llama", bias=attn, qkv_bias=attn, mlp_bias=mlp, **_rope(hf, src))


@dataclass(frozen=True)
class Family:
    """How one Hugging Face ``model_type`` maps onto lmforge."""

    keys: dict[str, str]  # config.json key ↔ DecoderConfig field
    defaults: dict[str, Any]  # for config.json keys that may be absent
    fields: Callable[[dict[str, Any], str], dict[str, Any]]  # checks + family-fixed fields
    key_map: Callable[[DecoderConfig], KeyMap]
    ignored: tuple[str, ...]  # tensors without weights: causal-mask buffers, cached RoPE tables
    prefix: str = ""  # added to names that lack it (the hub's gpt2 files have no "transformer.")


_MASKS = (".attn.bias", ".attn.masked_bias")
_GPT2 = Family(GPT2_KEYS, GPT2_DEFAULTS, _gpt2_fields, gpt2_key_map, _MASKS, "transformer.")
_LLAMA = Family(LLAMA_KEYS, LLAMA_DEFAULTS, _llama_fields, llama_key_map, ("rotary_emb.inv_freq",))
FAMILIES = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """A Hugging Face ``config.json`` (as a dict) → DecoderConfig; errors name key and value."""
    if (kind := hf_config.get("model_type")) not in FAMILIES:
        raise _unsupported(source, "model_type", kind, f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    values = family.defaults | hf_config
    if missing := [key for key in family.keys if key not in values]:
        raise CheckpointError(f"{source}: required keys missing: {', '.join(missing)}")
    data = {ours: values[key] for key, ours in family.keys.items()}
    data |= family.fields(hf_config, source) | dict(dropout=0.0)  # a fine-tune sets its own
    return validate_config(DecoderConfig, data, source)


def hf_model_type(cfg: DecoderConfig) -> str:
    """The Hugging Face architecture that computes exactly what ``cfg`` does, or ValueError."""
    style = (cfg.positions, cfg.norm, cfg.mlp)
    if style == ("learned", "layernorm", "gelu"):
        if not (cfg.bias and cfg.qkv_bias and cfg.mlp_bias):
            raise ValueError("Hugging Face GPT-2 has biases everywhere: export needs model.bias")
        return "gpt2"
    if style == ("rope", "rmsnorm", "swiglu"):
        if cfg.qkv_bias and not cfg.bias and not cfg.mlp_bias:
            return "qwen2"
        if cfg.bias != cfg.qkv_bias:  # Llama's attention_bias covers q, k, v and o together
            raise ValueError(
                "Hugging Face Llama has q/k/v and o biases together (attention_bias) or q/k/v "
                f"alone (Qwen2); model.bias={cfg.bias}, model.qkv_bias={cfg.qkv_bias} has neither"
            )
        return "llama"
    raise ValueError(
        f"no Hugging Face model has positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}; "
        "exportable: learned+layernorm+gelu (gpt2), rope+rmsnorm+swiglu (llama, qwen2)"
    )


def config_to_hf(cfg: DecoderConfig, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """DecoderConfig → a ``config.json`` dict that transformers 4.45+ and 5.x load."""
    if cfg.qk_norm:
        raise ValueError(
            "model.qk_norm (gain-free RMS norm of queries and keys) has no Hugging Face "
            "GPT-2/Llama/Qwen2 equivalent"
        )
    kind = hf_model_type(cfg)
    resolved = cfg.model_dump() | dict(d_ff=cfg.ff_width, n_kv_head=cfg.kv_heads)
    out = {"architectures": [HF_CLASSES[kind]], "model_type": kind}
    out |= {key: resolved[ours] for key, ours in FAMILIES[kind].keys.items()}
    out |= {f"{k}_token_id": v for k, v in (special_ids or {}).items()}
    if kind == "gpt2":
        drop = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
        return out | {"activation_function": "gelu_new"} | dict.fromkeys(drop, cfg.dropout)
    out |= dict(head_dim=cfg.d_model // cfg.n_head, hidden_act="silu")
    # rope_theta/rope_scaling is the transformers 4 spelling; 5 converts it to rope_parameters
    out |= dict(attention_dropout=cfg.dropout, rope_theta=cfg.rope_theta, rope_scaling=None)
    if (s := cfg.rope_scaling) is not None:
        extra = dict(rope_type=s.type, original_max_position_embeddings=s.original_context_length)
        out["rope_scaling"] = s.model_dump(include=set(LLAMA3_KEYS)) | extra
    if kind == "qwen2":
        return out | dict(use_sliding_window=False, sliding_window=None)
    return out | dict(attention_bias=cfg.bias, mlp_bias=cfg.mlp_bias)


def empty_decoder(cfg: DecoderConfig) -> Decoder:
    """A Decoder on the meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return Decoder(cfg)


def fill_decoder(
    model: Decoder,
    key_map: KeyMap,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ignored: tuple[str, ...] = (),
) -> Decoder:
    """Fill a meta-device ``model`` from (HF name, tensor) pairs as they stream in.

    A fused tensor is assembled once all its parts have arrived; only those parts are held.
    Every tensor of the key map must arrive and every arriving tensor must be in it (or end
    with one of ``ignored``), so a checkpoint with features lmforge lacks fails loudly.
    """
    wanted = {name: ours for ours, src in key_map.items() for name in src.names}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected, done = [], set()
    for name, tensor in tensors:
        ours = wanted.get(name)
        if ours is None:
            unexpected += [] if name.endswith(ignored) else [name]
            continue
        src, parts = key_map[ours], pending.setdefault(ours, {})
        parts[name] = tensor
        if len(parts) < len(src.names):
            continue
        del pending[ours]
        pieces = [parts[n].T if src.transpose else parts[n] for n in src.names]
        value = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        module_name, _, leaf = ours.rpartition(".")
        module = model.get_submodule(module_name)
        if value.shape != (expected := getattr(module, leaf).shape):
            raise CheckpointError(
                f"{source}: {' + '.join(src.names)} has shape {tuple(value.shape)}; "
                f"its config.json implies {tuple(expected)}"
            )
        setattr(module, leaf, nn.Parameter(value.to(device=device, dtype=dtype).contiguous()))
        done.add(ours)
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensors lmforge has no place for, e.g. {unexpected[:5]}; "
            "the checkpoint uses a feature its config does not declare"
        )
    missing = [n for ours, src in key_map.items() if ours not in done for n in src.names]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    if model.cfg.tie_embeddings:  # lm_head still holds the meta tensor: share the embedding
        model.lm_head.weight = model.tok_emb.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # its cos/sin buffers were built on meta
            module.reset_buffers(device)
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left on meta"
    return model


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names and layouts, for ``save_file``."""
    key_map = FAMILIES[hf_model_type(model.cfg)].key_map(model.cfg)
    ours = model.state_dict()
    assert set(ours) - set(key_map) <= {"lm_head.weight"}, set(ours) - set(key_map)
    return export_by_key_map(ours, key_map)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, {} if absent; CheckpointError names a broken one."""
    return read_json_object(path) if path.is_file() else {}


def declared_special_tokens(folder: Path, tok: Tokenizer) -> dict[str, int]:
    """``{"bos"|"eos"|"pad": id}`` that a Hugging Face folder declares, found as transformers
    finds them: the token strings of ``special_tokens_map.json`` over ``tokenizer_config.json``
    (a string or an AddedToken object), then the ids of ``generation_config.json`` over
    ``config.json`` (an EOS list's first id; stopping at all of them is ``ChatFormat.stop_ids``).
    A declared token the vocabulary lacks is skipped (transformers would add a new, untrained
    token)."""
    tokenizer_files = [_json_object(folder / f) for f in TOKENIZER_DECLARATIONS]
    model_files = [_json_object(folder / f) for f in MODEL_DECLARATIONS]
    size = tok.get_vocab_size(with_added_tokens=True)
    out = {}
    for key in ("bos", "eos", "pad"):
        candidates: list[int | None] = []
        for declared in tokenizer_files:
            value = declared.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            candidates.append(tok.token_to_id(value) if isinstance(value, str) else None)
        for declared in model_files:
            value = declared.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size
            candidates.append(value if ok else None)
        if (found := next((i for i in candidates if i is not None), None)) is not None:
            out[key] = found
    return out


def load_hf(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Decoder, Tokenizer | None]:
    """A Hugging Face model folder → (Decoder, its ``tokenizer.json`` or None if absent)."""
    folder, path = Path(folder), Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Hugging Face model needs it and safetensors")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, str(path))
    family = FAMILIES[hf["model_type"]]
    # a tied checkpoint may still store lm_head.weight: transformers ignores it, and so do we
    ignored = family.ignored + (("lm_head.weight",) if cfg.tie_embeddings else ())
    tensors = read_tensors(weight_files(folder), family.prefix, keep=("lm_head.",))
    model = empty_decoder(cfg)
    fill_decoder(model, family.key_map(cfg), tensors, str(folder), device, dtype, ignored)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        return model, None
    tokenizer = load_tokenizer(tok_path)
    declare_special_tokens(tokenizer, declared_special_tokens(folder, tokenizer))
    return model, tokenizer


def export_hf(model: Decoder, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write a folder ``transformers`` loads offline: config.json, model.safetensors, tokenizer.

    Written to a temporary folder next to ``out_dir`` and renamed when complete. ``out_dir``
    must not exist or be empty (an export never overwrites files).
    """
    ids = special_token_ids(tokenizer) if tokenizer is not None else {}
    config = config_to_hf(model.cfg, ids)  # raises before anything is written
    extra: dict[str, str] = {}
    if tokenizer is not None:
        tok_config: dict[str, Any] = dict(tokenizer_class="PreTrainedTokenizerFast")
        tok_config |= dict(
            clean_up_tokenization_spaces=False, model_max_length=model.cfg.context_length
        )
        tok_config |= {f"{k}_token": tokenizer.id_to_token(i) for k, i in ids.items()}
        extra["tokenizer_config.json"] = json.dumps(tok_config, indent=2) + "\n"
    return write_hf_folder(out_dir, hf_state_dict(model), config, tokenizer, extra)
