"""What a checkpoint is: ``manifest.json`` — kind, family, tokenizer, format version.

Every checkpoint lmforge writes declares itself, so a reader never has to guess from file
names or config keys::

    {"version": 1, "kind": "decoder", "family": "llama", "source": "lmforge",
     "tokenizer": "tokenizer.json", "sharded_optimizer": false, "lora": false}

Folders without a manifest — lmforge checkpoints written before it, Hugging Face folders,
PEFT adapter folders and ``.gguf`` files — get the same description from ``infer_manifest``
(``config.yaml``'s ``task:`` key and model section, ``config.json``'s ``model_type``,
``adapter_config.json``). The description of a model being saved comes from the model itself
(``describe``), so every recipe writes the right one without passing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.config import Section, format_validation_error
from lmforge.errors import CheckpointError

MANIFEST = "manifest.json"
# 1: the first manifest. Raise it when a reader of the old version would misread a new folder.
FORMAT_VERSION = 1

Kind = Literal[
    "decoder",
    "encoder-mlm",
    "sequence-classifier",
    "token-classifier",
    "image-classifier",
    "adapter",
    "encoder-decoder",
]


class Manifest(Section):
    """The self-description of a checkpoint (``manifest.json``)."""

    version: int = Field(FORMAT_VERSION, ge=1, description="manifest format version")
    kind: Kind = Field(description="what the weights are, i.e. which model class reads them")
    family: str = Field(description="architecture: gpt2, llama (decoders), bert (encoders)")
    source: Literal["lmforge", "hf", "gguf", "peft"] = Field(
        "lmforge", description="who wrote it: lmforge, Hugging Face, a GGUF file, peft"
    )
    tokenizer: str | None = Field(
        "tokenizer.json", description="tokenizer file inside the folder; null = none saved"
    )
    sharded_optimizer: bool = Field(
        False, description="optimizer state in optimizer/ (torch.distributed.checkpoint)"
    )
    lora: bool = Field(
        False, description="weights carry peft LoRA modules (a LoRA/DoRA training checkpoint)"
    )
    base: str | None = Field(None, description="adapter: the base model it was trained on")
    quantization: str | None = Field(
        None, description="torchao method of quantized weights (lmforge compress quantize)"
    )
    # Where it was read from and whether it was guessed; never written into the file.
    path: Path | None = Field(None, exclude=True)
    inferred: bool = Field(False, exclude=True)

    def to_json(self) -> str:
        # quantization only when set: float checkpoints keep the manifest they always had
        skip = {"quantization"} if self.quantization is None else set()
        return json.dumps(self.model_dump(mode="json", exclude=skip), indent=2) + "\n"


def describe(model: nn.Module, tokenizer: bool, sharded_optimizer: bool = False) -> Manifest:
    """The manifest of ``model`` (unwrapped) as a checkpoint is written: kind from its class,
    family from its config, ``lora`` when peft adapter modules are in it."""
    from lmforge.models.decoder import Decoder
    from lmforge.models.encoder import MaskedLMHead, SequenceClassifier, TokenClassifier
    from lmforge.models.vit import ImageClassifier

    kinds: dict[type, tuple[str, str]] = {
        MaskedLMHead: ("encoder-mlm", "bert"),
        SequenceClassifier: ("sequence-classifier", "bert"),
        TokenClassifier: ("token-classifier", "bert"),
        ImageClassifier: ("image-classifier", "vit"),
    }
    from lmforge.models.seq2seq import Seq2Seq

    if isinstance(model, Decoder):
        kind, family = "decoder", model.cfg.arch
    elif isinstance(model, Seq2Seq):
        kind, family = "encoder-decoder", model.cfg.style
    else:
        found = next((v for cls, v in kinds.items() if isinstance(model, cls)), None)
        assert found is not None, f"no checkpoint kind for {type(model).__name__}"
        kind, family = found
    lora = any("lora_A" in name for name, _ in model.named_modules())
    return Manifest(
        kind=kind,  # type: ignore[arg-type]  # one of Kind by the table above
        family=family,
        tokenizer="tokenizer.json" if tokenizer else None,
        sharded_optimizer=sharded_optimizer,
        lora=lora,
    )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(folder) / MANIFEST, manifest.to_json())


def read_json_object(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON object file that describes a checkpoint (``manifest.json``, Hugging Face
    ``config.json``, ``adapter_config.json``, ...); a damaged one is a CheckpointError naming it
    (``fix``: what to do about it)."""
    fix = f"; {fix}" if fix else ""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}): the file is damaged{fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object, got {type(value).__name__}: the file is damaged{fix}"
        )
    return value


def read_manifest(folder: Path) -> Manifest | None:
    """``folder/manifest.json`` validated, or None if the folder has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = read_json_object(path)
    version = data.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {version} was written by a newer lmforge (this one reads "
            f"up to {FORMAT_VERSION}); upgrade lmforge to read this checkpoint"
        )
    try:
        return Manifest.model_validate(data).model_copy(update={"path": Path(folder)})
    except ValidationError as e:
        raise CheckpointError(format_validation_error(e, Manifest, str(path))) from None


def manifest_of(path: Path) -> Manifest:
    """The manifest of a checkpoint path (as ``find_checkpoint`` returns it): the written one,
    else the one ``infer_manifest`` works out."""
    return (read_manifest(path) if path.is_dir() else None) or infer_manifest(path)


def infer_manifest(path: Path) -> Manifest:
    """The description of a folder or file that has no ``manifest.json``."""
    path = Path(path)
    guess = dict(path=path, inferred=True)
    if path.suffix == ".gguf" and path.is_file():
        return Manifest(kind="decoder", family="llama", source="gguf", tokenizer=None, **guess)
    if (path / "adapter_config.json").is_file():
        conf = _json(path / "adapter_config.json")
        base = conf.get("base_model_name_or_path") or None
        return Manifest(
            kind="adapter", family="lora", source="peft", tokenizer=None, base=base, **guess
        )
    tok = "tokenizer.json" if (path / "tokenizer.json").is_file() else None
    if (path / "config.yaml").is_file():
        return _infer_lmforge(path, tok, guess)
    if (path / "config.json").is_file():
        hf = _json(path / "config.json")
        model_type = hf.get("model_type")
        if model_type == "bert":
            archs = " ".join(hf.get("architectures") or [])
            kind = (
                "sequence-classifier"
                if "SequenceClassification" in archs
                else "token-classifier"
                if "TokenClassification" in archs
                else "encoder-mlm"
            )
            return Manifest(kind=kind, family="bert", source="hf", tokenizer=tok, **guess)
        if model_type in ("t5", "bart"):
            return Manifest(
                kind="encoder-decoder", family=model_type, source="hf", tokenizer=tok, **guess
            )
        if model_type == "vit":
            return Manifest(
                kind="image-classifier", family="vit", source="hf", tokenizer=None, **guess
            )
        return Manifest(kind="decoder", family=str(model_type), source="hf", tokenizer=tok, **guess)
    raise CheckpointError(
        f"{path}: neither manifest.json, config.yaml (lmforge) nor config.json (Hugging Face); "
        "cannot tell what this checkpoint is"
    )


def _infer_lmforge(path: Path, tok: str | None, guess: dict[str, Any]) -> Manifest:
    """An lmforge folder from before the manifest: ``config.yaml``'s ``task:`` says which
    recipe wrote it (classify, mlm); no ``task:`` = a decoder (pretrain, finetune)."""
    cfg_path = path / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: damaged, cannot be read ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: damaged, not a mapping of sections")
    task, model = cfg.get("task"), cfg.get("model") or {}
    # sharded_optimizer stays False: an old folder cannot vouch for its optimizer/ folder
    # (train/distributed.py looks at train_state.pt's optimizer_layout for those)
    common = dict(tokenizer=tok, **guess)
    if task == "classify":
        head = (cfg.get("head") or {}).get("task", "sequence")
        kind = "token-classifier" if head == "token" else "sequence-classifier"
        return Manifest(kind=kind, family="bert", lora=cfg.get("method") == "lora", **common)
    if task == "mlm":
        return Manifest(kind="encoder-mlm", family="bert", **common)
    if task == "seq2seq":
        style = model.get("style", "t5") if isinstance(model, dict) else "t5"
        return Manifest(kind="encoder-decoder", family=str(style), **common)
    if task == "classify-image":
        return Manifest(kind="image-classifier", family="vit", **common)
    lora = cfg.get("method") in ("lora", "dora", "qlora")  # a finetune run's own checkpoints
    family = model.get("arch", "gpt2") if isinstance(model, dict) else "gpt2"
    return Manifest(kind="decoder", family=str(family), lora=lora, **common)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: damaged, not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: damaged, not a JSON object")
    return data
