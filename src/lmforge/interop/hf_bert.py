"""Hugging Face BERT checkpoints in and out: one explicit key map, used by loading and export.

``BertModel`` folders (no ``bert.`` prefix, e.g. sentence-transformers' MiniLM) and
``BertForSequenceClassification`` folders (``bert.`` prefix + ``classifier``) both load; the
fused attention projection of lmforge is the rows ``[query; key; value]`` of BERT's three.
BERT models are small, so a checkpoint is read whole into a state dict and loaded strictly:
every tensor must find its place and every place must be filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.config import validate_config
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import CheckpointError
from lmforge.interop.key_map import KeyMap, Source, export_by_key_map, load_by_key_map
from lmforge.interop.safetensors_folder import read_tensors, weight_files, write_hf_folder
from lmforge.models.encoder import Encoder, EncoderConfig, HeadConfig, SequenceClassifier

# lmforge module in block i → BERT module in encoder.layer.i (query/key/value fuse into qkv)
BERT_BLOCK = {
    "attn.proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "norm2": "output.LayerNorm",
}
BERT_EMBEDDINGS = {
    "tok_emb": "embeddings.word_embeddings",
    "pos_emb": "embeddings.position_embeddings",
    "type_emb": "embeddings.token_type_embeddings",
}
# Tensors that are no weights (position_ids buffer) or belong to heads lmforge does not load
# into an Encoder (pre-training heads of a BertForPreTraining folder).
IGNORED = ("embeddings.position_ids", "cls.", "bert.embeddings.position_ids", "bert.cls.")

# EncoderConfig field ↔ config.json key
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "norm_eps": "layer_norm_eps",
    "pad_id": "pad_token_id",
}
DEFAULTS = dict(
    max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0
)


def bert_key_map(cfg: EncoderConfig) -> KeyMap:
    """Encoder tensor names → BertModel's."""
    d = cfg.d_model
    km: KeyMap = {
        f"{ours}.weight": Source((f"{hf}.weight",)) for ours, hf in BERT_EMBEDDINGS.items()
    }
    for leaf in ("weight", "bias"):
        km[f"emb_norm.{leaf}"] = Source((f"embeddings.LayerNorm.{leaf}",))
        for i in range(cfg.n_layer):
            hf = f"encoder.layer.{i}."
            qkv = tuple(f"{hf}attention.self.{p}.{leaf}" for p in ("query", "key", "value"))
            km[f"blocks.{i}.attn.qkv.{leaf}"] = Source(qkv, (d, d, d))
            for ours, theirs in BERT_BLOCK.items():
                km[f"blocks.{i}.{ours}.{leaf}"] = Source((f"{hf}{theirs}.{leaf}",))
        if cfg.pooler:
            km[f"pooler.{leaf}"] = Source((f"pooler.dense.{leaf}",))
    return km


def classifier_key_map(cfg: EncoderConfig) -> KeyMap:
    """SequenceClassifier tensor names → BertForSequenceClassification's."""
    km = {
        f"encoder.{k}": Source(tuple(f"bert.{n}" for n in s.names), s.rows)
        for k, s in bert_key_map(cfg).items()
    }
    for leaf in ("weight", "bias"):
        km[f"classifier.{leaf}"] = Source((f"classifier.{leaf}",))
    return km


def config_from_hf(hf: dict[str, Any], has_pooler: bool, source: str) -> EncoderConfig:
    """A BERT ``config.json`` dict → EncoderConfig; unsupported variants name the key."""
    if hf.get("model_type") != "bert":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}; supported: bert")
    for key, ok in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (supported: {ok})")
    if hf.get("is_decoder", False):
        raise CheckpointError(f"{source}: is_decoder=true is not supported (encoders only)")
    values = DEFAULTS | hf
    if missing := [k for k in CONFIG_KEYS.values() if k not in values]:
        raise CheckpointError(f"{source}: required keys missing: {', '.join(missing)}")
    data = {ours: values[key] for ours, key in CONFIG_KEYS.items()}
    data |= dict(dropout=hf.get("hidden_dropout_prob", 0.1), pooler=has_pooler)
    return validate_config(EncoderConfig, data, source)


def config_to_hf(
    cfg: EncoderConfig, labels: list[str] | None = None, multi_label: bool = False
) -> dict[str, Any]:
    """EncoderConfig (+ label names for a classifier) → a BERT ``config.json`` dict."""
    out: dict[str, Any] = {"model_type": "bert", "architectures": ["BertModel"]}
    resolved = cfg.model_dump() | dict(d_ff=cfg.ff_width)
    out |= {key: resolved[ours] for ours, key in CONFIG_KEYS.items()}
    out |= dict(hidden_act="gelu", position_embedding_type="absolute")
    out |= dict(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if labels is not None:
        out["architectures"] = ["BertForSequenceClassification"]
        out["id2label"] = dict(enumerate(labels))
        out["label2id"] = {name: i for i, name in enumerate(labels)}
        if multi_label:
            out["problem_type"] = "multi_label_classification"
    return out


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    return dict(read_tensors(weight_files(folder)))


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Hugging Face model needs it and safetensors")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _tokenizer(folder: Path) -> Tokenizer | None:
    path = folder / "tokenizer.json"
    return load_tokenizer(path) if path.is_file() else None


def is_hf_bert(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "bert"


def load_hf_encoder(folder: str | Path) -> tuple[Encoder, Tokenizer | None]:
    """A BertModel (or any BERT) folder → (Encoder, tokenizer or None); task heads are skipped."""
    folder = Path(folder)
    hf = _read_config(folder)
    tensors = _read_all(folder)
    prefix = "bert." if any(n.startswith("bert.") for n in tensors) else ""
    tensors = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
    cfg = config_from_hf(hf, "pooler.dense.weight" in tensors, str(folder / "config.json"))
    model = Encoder(cfg)
    load_by_key_map(model, bert_key_map(cfg), tensors, str(folder), IGNORED)
    return model, _tokenizer(folder)


def load_hf_classifier(
    folder: str | Path,
) -> tuple[SequenceClassifier, Tokenizer | None, list[str]]:
    """A BertForSequenceClassification folder → (classifier, tokenizer, label names)."""
    folder = Path(folder)
    hf = _read_config(folder)
    tensors = _read_all(folder)
    if "classifier.weight" not in tensors:
        raise CheckpointError(
            f"{folder}: no classifier.weight; not a BertForSequenceClassification"
        )
    cfg = config_from_hf(hf, "bert.pooler.dense.weight" in tensors, str(folder / "config.json"))
    n = tensors["classifier.weight"].shape[0]
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(n)}
    labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(n)]
    multi = hf.get("problem_type") == "multi_label_classification"
    head = HeadConfig(
        task="multilabel" if multi else "sequence",
        num_labels=n,
        pooling="cls",
        dropout=hf.get("classifier_dropout") or cfg.dropout,
    )
    model = SequenceClassifier(Encoder(cfg), head)
    load_by_key_map(model, classifier_key_map(cfg), tensors, str(folder), IGNORED)
    return model, _tokenizer(folder), labels


def hf_state_dict(model: Encoder | SequenceClassifier) -> dict[str, torch.Tensor]:
    """The model's tensors under BERT names, for ``save_file``."""
    if isinstance(model, SequenceClassifier):
        if model.head_cfg.pooling != "cls" or not model.encoder.cfg.pooler:
            raise ValueError(
                "BertForSequenceClassification pools [CLS] through the pooler: export needs head.pooling=cls and model.pooler=true"
            )
        key_map = classifier_key_map(model.encoder.cfg)
    else:
        key_map = bert_key_map(model.cfg)
    return export_by_key_map(model.state_dict(), key_map)


def export_hf_bert(
    model: Encoder | SequenceClassifier,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    labels: list[str] | None = None,
) -> Path:
    """Write a folder ``transformers`` loads offline (BertModel, or BertForSequenceClassification
    when ``model`` is a classifier). ``out_dir`` must not exist or be empty."""
    if isinstance(model, SequenceClassifier):
        n = model.head_cfg.num_labels
        labels = labels or [f"LABEL_{i}" for i in range(n)]
        config = config_to_hf(model.encoder.cfg, labels, model.head_cfg.task == "multilabel")
        config["classifier_dropout"] = model.head_cfg.dropout
    else:
        config = config_to_hf(model.cfg)
    tensors = hf_state_dict(model)  # raises before anything is written
    extra: dict[str, str] = {}
    if tokenizer is not None:
        specials = {
            f"{k}_token": k.upper().join("[]") for k in ("cls", "sep", "pad", "unk", "mask")
        }
        specials = {k: v for k, v in specials.items() if tokenizer.token_to_id(v) is not None}
        tok_config = dict(tokenizer_class="PreTrainedTokenizerFast", **specials)
        extra["tokenizer_config.json"] = json.dumps(tok_config, indent=2) + "\n"
    return write_hf_folder(out_dir, tensors, config, tokenizer, extra)
