"""``load(path)`` → (model, tokenizer, manifest): the one reader of checkpoints for inference.

    import lmforge
    model, tokenizer, manifest = lmforge.load("runs/pretrain-…")   # decoder: (B, T) → (B, T, V)

Accepts what ``find_checkpoint`` accepts — an lmforge checkpoint, run or ``checkpoints/``
folder, a Hugging Face folder, a ``.gguf`` file, a PEFT adapter folder — and builds the model
the manifest (``manifest.py``) names. Every command that takes ``--checkpoint`` goes through
here, with ``expect`` naming the kinds it can use, so the wrong kind is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.checkpoint.manifest import Kind, Manifest, manifest_of
from lmforge.checkpoint.store import find_checkpoint, load_weights, pointed
from lmforge.config import read_yaml, validate_config
from lmforge.errors import CheckpointError

CLASSIFIERS = ("sequence-classifier", "token-classifier", "image-classifier")

# What each kind is, and what to do with it instead, for the wrong-kind error.
_WHAT = {
    "decoder": "a decoder language model",
    "encoder-mlm": "a masked-LM encoder (lmforge mlm): it fills in masked tokens and has no "
    "next-token head; it cannot generate text or be scored by perplexity",
    "sequence-classifier": "a sequence classifier (lmforge classify): use `lmforge eval "
    "--checkpoint {path} --data LABELLED_FILE` for its metrics",
    "token-classifier": "a token classifier: use it from Python with lmforge.load",
    "encoder-decoder": "an encoder-decoder (T5/BART) model: fine-tune it with `lmforge "
    "seq2seq --init {path}`, or use it from Python with lmforge.load",
    "image-classifier": "a ViT image classifier (lmforge classify-image): use `lmforge explain "
    "--checkpoint {path} --image FILE` or lmforge.load",
    "adapter": "a LoRA adapter for base {base}: use `lmforge merge --base {base} --adapter "
    "{path} --out_dir MERGED` and pass MERGED",
}


class Loaded(NamedTuple):
    """What ``load`` returns; unpacks as ``model, tokenizer, manifest``."""

    model: nn.Module
    tokenizer: Tokenizer  # None only for image-classifier (pixels need no tokenizer)
    manifest: Manifest


def load(
    path: str | Path,
    device: torch.device | str = "cpu",
    expect: Kind | tuple[Kind, ...] | None = None,
) -> Loaded:
    """The model (eval mode, on ``device``), its tokenizer and its manifest (``.path`` is the
    resolved checkpoint). ``expect``: the kinds the caller can use; any other kind is a
    ``CheckpointError`` that says what the checkpoint is and which command takes it.

    A classifier run folder gives its ``best`` checkpoint (else its latest).
    """
    device = torch.device(device)
    ckpt = find_checkpoint(path)
    manifest = manifest_of(ckpt)
    if manifest.kind in CLASSIFIERS and ckpt.parent.name == "checkpoints":
        given = Path(path)
        best = pointed(ckpt.parent, "best")
        if best is not None and given.resolve() != ckpt.resolve():  # a run folder was given
            ckpt, manifest = best, manifest_of(best)
    check_kind(manifest, expect)
    model, tokenizer = _build(ckpt, manifest, device)
    if tokenizer is None and manifest.kind != "image-classifier":
        raise CheckpointError(
            f"{ckpt}: no tokenizer could be loaded (tokenizer.json missing, or a GGUF "
            "tokenizer lmforge cannot build); generate and eval need one"
        )
    return Loaded(model.to(device).eval(), tokenizer, manifest)


def check_kind(manifest: Manifest, expect: Kind | tuple[Kind, ...] | None) -> None:
    """Raise unless ``manifest.kind`` is one of ``expect`` (None: any kind that is a model)."""
    kinds = (expect,) if isinstance(expect, str) else expect
    if manifest.kind in (kinds or ()) or (kinds is None and manifest.kind != "adapter"):
        return
    what = _WHAT[manifest.kind].format(path=manifest.path, base=manifest.base or "BASE")
    wanted = " or ".join(kinds) if kinds else "a model"
    raise CheckpointError(f"{manifest.path} is {what}; this command needs {wanted}")


def _build(
    ckpt: Path, manifest: Manifest, device: torch.device
) -> tuple[nn.Module, Tokenizer | None]:
    if manifest.source == "gguf":
        from lmforge.interop.gguf import load_gguf

        return load_gguf(ckpt)
    if manifest.source == "hf":
        if manifest.kind == "decoder":
            from lmforge.interop.hf import load_hf

            return load_hf(ckpt, device)
        if manifest.kind == "encoder-decoder":
            from lmforge.interop.hf_seq2seq import load_hf_seq2seq

            return load_hf_seq2seq(ckpt)
        if manifest.kind == "image-classifier":
            from lmforge.interop.hf_vit import load_hf_vit

            return load_hf_vit(ckpt), None
        from lmforge.interop import hf_bert

        if manifest.kind == "sequence-classifier":
            model, tokenizer, _labels = hf_bert.load_hf_classifier(ckpt)
            return model, tokenizer
        if manifest.kind == "encoder-mlm":
            return hf_bert.load_hf_encoder(ckpt)
        raise CheckpointError(f"{ckpt}: Hugging Face {manifest.kind} folders are not supported")
    if manifest.source != "lmforge":
        raise CheckpointError(f"{ckpt}: {manifest.source} folders hold no model to load")
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt}: config.yaml is missing; cannot tell which model to build")
    cfg = read_yaml(cfg_path)
    if manifest.kind == "decoder":
        model = _decoder(ckpt, cfg, manifest)
    elif manifest.kind == "encoder-decoder":
        from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

        source = f"{cfg_path} (model)"
        model = Seq2Seq(validate_config(Seq2SeqConfig, cfg.get("model") or {}, source))
    elif manifest.kind == "image-classifier":
        from lmforge.models.vit import ImageClassifier, ViTConfig

        vit_cfg = validate_config(ViTConfig, cfg.get("model") or {}, f"{cfg_path} (model)")
        model = ImageClassifier(vit_cfg)
    else:
        model = _encoder(cfg, manifest, str(cfg_path))
    if manifest.quantization:  # torchao tensors, stored as plain tensors + a description
        from lmforge.checkpoint.quantized import load_quantized

        load_quantized(model, ckpt)
    else:
        load_weights(model, ckpt)
    tokenizer = None
    if manifest.tokenizer and (ckpt / manifest.tokenizer).is_file():
        from lmforge.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ckpt / manifest.tokenizer)
    return model, tokenizer


def _decoder(ckpt: Path, cfg: dict[str, Any], manifest: Manifest) -> nn.Module:
    from lmforge.models.decoder import Decoder, DecoderConfig

    if manifest.lora or not cfg.get("model"):
        # finetune's own training checkpoints: adapters under peft's names, the model in the base
        raise CheckpointError(
            f"{ckpt}: a training checkpoint of `lmforge finetune` (to resume it: "
            f"`lmforge finetune --resume {ckpt}`); for inference use the run's model/ folder, "
            "or adapter/ with `lmforge merge`"
        )
    model_cfg = validate_config(DecoderConfig, cfg["model"], f"{ckpt / 'config.yaml'} (model)")
    return Decoder(model_cfg)


def _encoder(cfg: dict[str, Any], manifest: Manifest, source: str) -> nn.Module:
    from lmforge.models.encoder import (
        Encoder,
        EncoderConfig,
        HeadConfig,
        MaskedLMHead,
        build_task_model,
    )

    enc_cfg = validate_config(EncoderConfig, cfg.get("model") or {}, f"{source} (model)")
    if manifest.kind == "encoder-mlm":
        return MaskedLMHead(Encoder(enc_cfg))
    head = validate_config(HeadConfig, cfg.get("head") or {}, f"{source} (head)")
    model = build_task_model(enc_cfg, head)
    if manifest.lora:  # the checkpoint holds peft's module names (base_layer, lora_A/B)
        from lmforge.models.lora import LoraConfig, apply_lora

        apply_lora(model, validate_config(LoraConfig, cfg.get("lora") or {}, f"{source} (lora)"))
    return model
