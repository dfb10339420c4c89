"""Hugging Face T5 and BART checkpoints in and out: one explicit key map per style, used by
loading and by export (``T5ForConditionalGeneration``, ``BartForConditionalGeneration``).

lmforge fuses what Hugging Face keeps apart: self-attention q/k/v are the rows
``[q; k; v]`` of one ``qkv`` matrix, cross-attention k/v the rows ``[k; v]`` of ``kv``. Tied
tensors (the token embedding shared by both stacks and the lm head) are stored once by
``save_pretrained``; the map points every tied lmforge tensor at that one name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.checkpoint.manifest import read_json_object
from lmforge.config import validate_config
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import CheckpointError
from lmforge.interop.key_map import KeyMap, Source, export_by_key_map, load_by_key_map
from lmforge.interop.safetensors_folder import read_tensors, weight_files, write_hf_folder
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

STYLES = ("t5", "bart")
T5_MLP = {"relu": "relu", "gated-gelu": "gated-gelu"}  # feed_forward_proj → ours
BART_MLP = {"gelu": "gelu", "relu": "relu"}  # activation_function → ours


def _mlp_map(km: KeyMap, ours: str, hf: str, kind: str, gated_names: tuple[str, str, str]) -> None:
    gate, up, down = gated_names
    if kind == "gated-gelu":
        for o, h in (("gate", gate), ("up", up), ("proj", down)):
            km[f"{ours}.mlp.{o}.weight"] = Source((f"{hf}.{h}.weight",))
    else:
        for o, h in (("fc", up), ("proj", down)):
            km[f"{ours}.mlp.{o}.weight"] = Source((f"{hf}.{h}.weight",))


def t5_key_map(cfg: Seq2SeqConfig) -> KeyMap:
    """Seq2Seq (style t5) tensor names → T5ForConditionalGeneration's."""
    inner = cfg.n_head * (cfg.head_dim or cfg.d_model // cfg.n_head)
    km: KeyMap = {"tok_emb.weight": Source(("shared.weight",))}
    km["lm_head.weight"] = Source(("shared.weight",) if cfg.tie_embeddings else ("lm_head.weight",))
    for stack, n in (("encoder", cfg.n_encoder_layer), ("decoder", cfg.n_decoder_layer)):
        km[f"{stack}.rel_bias.emb.weight"] = Source(
            (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
        )
        km[f"{stack}.final_norm.weight"] = Source((f"{stack}.final_layer_norm.weight",))
        for i in range(n):
            ours, hf = f"{stack}.layers.{i}", f"{stack}.block.{i}.layer"
            att = f"{hf}.0.SelfAttention"
            km[f"{ours}.self_attn.qkv.weight"] = Source(
                tuple(f"{att}.{p}.weight" for p in "qkv"), (inner,) * 3
            )
            km[f"{ours}.self_attn.proj.weight"] = Source((f"{att}.o.weight",))
            km[f"{ours}.norm1.weight"] = Source((f"{hf}.0.layer_norm.weight",))
            ff = 1
            if stack == "decoder":
                cross = f"{hf}.1.EncDecAttention"
                km[f"{ours}.cross_attn.q.weight"] = Source((f"{cross}.q.weight",))
                km[f"{ours}.cross_attn.kv.weight"] = Source(
                    (f"{cross}.k.weight", f"{cross}.v.weight"), (inner, inner)
                )
                km[f"{ours}.cross_attn.proj.weight"] = Source((f"{cross}.o.weight",))
                km[f"{ours}.norm_cross.weight"] = Source((f"{hf}.1.layer_norm.weight",))
                ff = 2
            gated = ("wi_0", "wi_1", "wo") if cfg.mlp == "gated-gelu" else ("", "wi", "wo")
            _mlp_map(km, ours, f"{hf}.{ff}.DenseReluDense", cfg.mlp, gated)
            km[f"{ours}.norm2.weight"] = Source((f"{hf}.{ff}.layer_norm.weight",))
    return km


def bart_key_map(cfg: Seq2SeqConfig) -> KeyMap:
    """Seq2Seq (style bart) tensor names → BartForConditionalGeneration's."""
    d = cfg.d_model
    km: KeyMap = {"tok_emb.weight": Source(("model.shared.weight",))}
    km["lm_head.weight"] = Source(
        ("model.shared.weight",) if cfg.tie_embeddings else ("lm_head.weight",)
    )
    km["logits_bias"] = Source(("final_logits_bias",))
    for stack, n in (("encoder", cfg.n_encoder_layer), ("decoder", cfg.n_decoder_layer)):
        hf_stack = f"model.{stack}"
        km[f"{stack}.pos_emb.weight"] = Source((f"{hf_stack}.embed_positions.weight",))
        for leaf in ("weight", "bias"):
            km[f"{stack}.emb_norm.{leaf}"] = Source((f"{hf_stack}.layernorm_embedding.{leaf}",))
            for i in range(n):
                ours, hf = f"{stack}.layers.{i}", f"{hf_stack}.layers.{i}"
                pairs = {
                    "self_attn.proj": "self_attn.out_proj",
                    "norm1": "self_attn_layer_norm",
                    "mlp.fc": "fc1",
                    "mlp.proj": "fc2",
                    "norm2": "final_layer_norm",
                }
                km[f"{ours}.self_attn.qkv.{leaf}"] = Source(
                    tuple(f"{hf}.self_attn.{p}_proj.{leaf}" for p in "qkv"), (d, d, d)
                )
                if stack == "decoder":
                    pairs |= {
                        "cross_attn.q": "encoder_attn.q_proj",
                        "cross_attn.proj": "encoder_attn.out_proj",
                        "norm_cross": "encoder_attn_layer_norm",
                    }
                    km[f"{ours}.cross_attn.kv.{leaf}"] = Source(
                        (f"{hf}.encoder_attn.k_proj.{leaf}", f"{hf}.encoder_attn.v_proj.{leaf}"),
                        (d, d),
                    )
                for o, h in pairs.items():
                    km[f"{ours}.{o}.{leaf}"] = Source((f"{hf}.{h}.{leaf}",))
    return km


def key_map(cfg: Seq2SeqConfig) -> KeyMap:
    return t5_key_map(cfg) if cfg.style == "t5" else bart_key_map(cfg)


def _get(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source}: required key {key!r} is missing")
    return hf[key]


def config_from_hf(hf: dict[str, Any], has_lm_head: bool, source: str) -> Seq2SeqConfig:
    """A T5 or BART ``config.json`` dict → Seq2SeqConfig; unsupported variants name the key."""
    style = hf.get("model_type")
    if style not in STYLES:
        raise CheckpointError(f"{source}: model_type={style!r}; supported: {', '.join(STYLES)}")
    if style == "t5":
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in T5_MLP:
            raise CheckpointError(
                f"{source}: feed_forward_proj={proj!r} is not supported (supported: relu, gated-gelu)"
            )
        n_layer = _get(hf, "num_layers", source)
        # transformers 5 reads tie_word_embeddings=false (T5 v1.1) as "do not scale the output"
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
        data = dict(
            style="t5",
            vocab_size=_get(hf, "vocab_size", source),
            d_model=_get(hf, "d_model", source),
            n_head=_get(hf, "num_heads", source),
            head_dim=_get(hf, "d_kv", source),
            d_ff=_get(hf, "d_ff", source),
            n_encoder_layer=n_layer,
            n_decoder_layer=hf.get("num_decoder_layers") or n_layer,
            mlp=T5_MLP[proj],
            dropout=hf.get("dropout_rate", 0.1),
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            rel_buckets=hf.get("relative_attention_num_buckets", 32),
            rel_max_distance=hf.get("relative_attention_max_distance", 128),
            tie_embeddings=not has_lm_head,
            scale_output=bool(scale),
            pad_id=hf.get("pad_token_id", 0),
            decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
            eos_id=hf.get("eos_token_id", 1),
        )
    else:
        for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):  # fmt: skip
            if hf.get(ours) != hf.get(theirs):
                raise CheckpointError(f"{source}: {ours} != {theirs} is not supported")
        act = hf.get("activation_function", "gelu")
        if act not in BART_MLP:
            raise CheckpointError(
                f"{source}: activation_function={act!r} is not supported (supported: gelu, relu)"
            )
        data = dict(
            style="bart",
            vocab_size=_get(hf, "vocab_size", source),
            d_model=_get(hf, "d_model", source),
            n_head=_get(hf, "encoder_attention_heads", source),
            d_ff=_get(hf, "encoder_ffn_dim", source),
            n_encoder_layer=_get(hf, "encoder_layers", source),
            n_decoder_layer=_get(hf, "decoder_layers", source),
            mlp=BART_MLP[act],
            dropout=hf.get("dropout", 0.1),
            norm_eps=1e-5,  # transformers' BART uses nn.LayerNorm's default
            context_length=_get(hf, "max_position_embeddings", source),
            tie_embeddings=not has_lm_head,
            scale_embedding=hf.get("scale_embedding", False),
            pad_id=hf.get("pad_token_id", 1),
            decoder_start_id=hf.get("decoder_start_token_id", 2),
            eos_id=hf.get("eos_token_id", 2),
        )
    return validate_config(Seq2SeqConfig, data, source)


def config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    """Seq2SeqConfig → a ``config.json`` dict ``transformers`` builds the same model from."""
    common = dict(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        pad_token_id=cfg.pad_id,
        eos_token_id=cfg.eos_id,
        decoder_start_token_id=cfg.decoder_start_id,
        is_encoder_decoder=True,
    )
    if cfg.style == "t5":
        return dict(
            model_type="t5",
            architectures=["T5ForConditionalGeneration"],
            num_heads=cfg.n_head,
            d_kv=cfg.head_dim or cfg.d_model // cfg.n_head,
            d_ff=cfg.d_ff,
            num_layers=cfg.n_encoder_layer,
            num_decoder_layers=cfg.n_decoder_layer,
            feed_forward_proj=cfg.mlp,
            dropout_rate=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            relative_attention_num_buckets=cfg.rel_buckets,
            relative_attention_max_distance=cfg.rel_max_distance,
            # transformers 5 ties T5's head always and reads this key as "scale the output"
            tie_word_embeddings=cfg.scale_output,
            **common,
        )
    return dict(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
        encoder_attention_heads=cfg.n_head,
        decoder_attention_heads=cfg.n_head,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        encoder_layers=cfg.n_encoder_layer,
        decoder_layers=cfg.n_decoder_layer,
        activation_function=cfg.mlp,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=cfg.context_length,
        scale_embedding=cfg.scale_embedding,
        tie_word_embeddings=cfg.tie_embeddings,
        forced_eos_token_id=None,
        **common,
    )


def is_hf_seq2seq(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and read_json_object(path).get("model_type") in STYLES


def load_hf_seq2seq(folder: str | Path) -> tuple[Seq2Seq, Tokenizer | None]:
    """A T5ForConditionalGeneration / BartForConditionalGeneration folder → (model, tokenizer)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: a Hugging Face model needs it")
    hf = read_json_object(cfg_path)
    tensors = dict(read_tensors(weight_files(folder)))
    # A separate lm_head only when it differs from the shared embedding (some writers save both)
    shared = tensors.get("shared.weight", tensors.get("model.shared.weight"))
    head = tensors.get("lm_head.weight")
    untied = head is not None and (shared is None or not torch.equal(head, shared))
    if hf.get("model_type") == "t5" and untied:
        raise CheckpointError(
            f"{folder}: a T5 lm_head.weight different from shared.weight; transformers 5 ties "
            "T5's head to the embedding, and so does lmforge"
        )
    cfg = config_from_hf(hf, untied, str(cfg_path))
    model = Seq2Seq(cfg)
    km = key_map(cfg)
    used = {n for src in km.values() for n in src.names}
    # tied copies, encoder/decoder embed_tokens, and position ids are not weights of their own
    ignorable = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    tensors = {n: t for n, t in tensors.items() if n in used or not n.endswith(ignorable)}
    load_by_key_map(model, km, tensors, str(folder))
    tok = folder / "tokenizer.json"
    return model, load_tokenizer(tok) if tok.is_file() else None


def hf_state_dict(model: Seq2Seq) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (each tied tensor once), for ``save_file``."""
    if model.cfg.style == "t5" and not model.cfg.tie_embeddings:
        raise ValueError(
            "transformers 5 ties T5's lm_head to the embedding: export needs tie_embeddings"
        )
    return export_by_key_map(model.state_dict(), key_map(model.cfg), clone=True)


def export_hf_seq2seq(model: Seq2Seq, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write a folder ``transformers`` loads offline with ``AutoModelForSeq2SeqLM``;
    ``out_dir`` must not exist or be empty."""
    tensors = hf_state_dict(model)  # raises before anything is written
    return write_hf_folder(out_dir, tensors, config_to_hf(model.cfg), tokenizer)
