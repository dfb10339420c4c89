"""Hugging Face ``ViTForImageClassification`` checkpoints in and out: one explicit key map.

The names are those of the Hub checkpoints (``vit.encoder.layer.i.attention.attention.query``;
transformers 5 renames them in memory but still reads and writes these). lmforge's fused
attention projection is the rows ``[query; key; value]``. ViT classifiers are small, so a
checkpoint is read whole and loaded strictly (``key_map.load_by_key_map``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.manifest import read_json_object
from lmforge.config import validate_config
from lmforge.errors import CheckpointError
from lmforge.interop.key_map import KeyMap, Source, export_by_key_map, load_by_key_map
from lmforge.interop.safetensors_folder import read_tensors, weight_files, write_hf_folder
from lmforge.models.vit import ImageClassifier, ViTConfig

# lmforge module in block i → HF module in vit.encoder.layer.i (query/key/value fuse into qkv)
VIT_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
}
# ViTConfig field ↔ config.json key
CONFIG_KEYS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "norm_eps": "layer_norm_eps",
}
DEFAULTS = dict(image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-12)


def vit_key_map(cfg: ViTConfig) -> KeyMap:
    """ImageClassifier tensor names → ViTForImageClassification's."""
    d = cfg.d_model
    km: KeyMap = {
        "vit.cls_token": Source(("vit.embeddings.cls_token",)),
        "vit.pos_emb": Source(("vit.embeddings.position_embeddings",)),
    }
    for leaf in ("weight", "bias"):
        km[f"vit.patch_emb.proj.{leaf}"] = Source(
            (f"vit.embeddings.patch_embeddings.projection.{leaf}",)
        )
        for i in range(cfg.n_layer):
            hf = f"vit.encoder.layer.{i}."
            qkv = tuple(f"{hf}attention.attention.{p}.{leaf}" for p in ("query", "key", "value"))
            km[f"vit.blocks.{i}.attn.qkv.{leaf}"] = Source(qkv, (d, d, d))
            for ours, theirs in VIT_BLOCK.items():
                km[f"vit.blocks.{i}.{ours}.{leaf}"] = Source((f"{hf}{theirs}.{leaf}",))
        km[f"vit.norm.{leaf}"] = Source((f"vit.layernorm.{leaf}",))
        km[f"classifier.{leaf}"] = Source((f"classifier.{leaf}",))
    return km


def is_hf_vit(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "vit"


def config_from_hf(hf: dict[str, Any], num_labels: int, source: str) -> ViTConfig:
    """A ViT ``config.json`` dict → ViTConfig; unsupported variants name the key."""
    if hf.get("model_type") != "vit":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}; supported: vit")
    for key, ok in (("hidden_act", "gelu"), ("qkv_bias", True)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (supported: {ok})")
    values = DEFAULTS | hf
    for key in ("image_size", "patch_size"):
        if not isinstance(values.get(key), int):
            raise CheckpointError(
                f"{source}: {key}={values.get(key)!r}; lmforge reads square images (one integer)"
            )
    if missing := [k for k in CONFIG_KEYS.values() if k not in values]:
        raise CheckpointError(f"{source}: required keys missing: {', '.join(missing)}")
    id2label = hf.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]
    data = {ours: values[key] for ours, key in CONFIG_KEYS.items()}
    data |= dict(dropout=hf.get("hidden_dropout_prob", 0.0), num_labels=num_labels, labels=labels)
    return validate_config(ViTConfig, data, source)


def config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """ViTConfig → a ``ViTForImageClassification`` config.json dict."""
    resolved = cfg.model_dump() | dict(d_ff=cfg.ff_width)
    labels = cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    out: dict[str, Any] = {"model_type": "vit", "architectures": ["ViTForImageClassification"]}
    out |= {key: resolved[ours] for ours, key in CONFIG_KEYS.items()}
    out |= dict(hidden_act="gelu", qkv_bias=True)
    out |= dict(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    out |= dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return out


def load_hf_vit(folder: str | Path) -> ImageClassifier:
    """A ViTForImageClassification folder → ImageClassifier (eval-ready, fp32)."""
    folder = Path(folder)
    hf = read_json_object(folder / "config.json")
    tensors = dict(read_tensors(weight_files(folder)))
    if "classifier.weight" not in tensors:
        raise CheckpointError(
            f"{folder}: no classifier.weight; lmforge reads ViTForImageClassification folders "
            "(a bare ViTModel has no head to classify with)"
        )
    n = tensors["classifier.weight"].shape[0]
    cfg = config_from_hf(hf, n, str(folder / "config.json"))
    model = ImageClassifier(cfg)
    # pooler tensors belong to ViTModel(add_pooling_layer=True), unused by the classifier
    load_by_key_map(model, vit_key_map(cfg), tensors, str(folder), ("vit.pooler.",))
    return model


def hf_state_dict(model: ImageClassifier) -> dict[str, torch.Tensor]:
    """The model's tensors under HF ViT names, for ``save_file``."""
    if model.cfg.pooling != "cls":
        raise ValueError(
            "ViTForImageClassification classifies the [CLS] state: export needs model.pooling=cls"
        )
    return export_by_key_map(model.state_dict(), vit_key_map(model.cfg))


def export_hf_vit(model: ImageClassifier, out_dir: str | Path) -> Path:
    """Write a folder ``transformers`` loads as ViTForImageClassification (offline).
    ``out_dir`` must not exist or be empty."""
    tensors = hf_state_dict(model)  # raises before anything is written
    return write_hf_folder(out_dir, tensors, config_to_hf(model.cfg), None)
