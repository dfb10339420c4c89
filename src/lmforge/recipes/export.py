"""``lmforge export``: write a checkpoint for the runtime it is deployed on, checked by that runtime.

    lmforge export --checkpoint runs/pretrain-…/ --format hf|onnx|gguf --out_dir my-model/

``hf``    a Hugging Face transformers folder (``interop/hf.py``, ``interop/hf_bert.py``)
``onnx``  ``model.onnx`` (+ ``decoder_with_past.onnx`` for decoders) for onnxruntime
          (``interop/onnx.py``)
``gguf``  one ``.gguf`` file for llama.cpp / Ollama, ``--gguf_type f32|f16|q8_0|q4_0``
          (``interop/gguf_export.py``)

Checks (``interop/export_checks.py``) run on the source before anything is written — EOS/BOS/PAD
ids, the chat template, a merged ``--adapter`` really changed the weights — and on the written
files read back by their consumer after: logits and a greedy continuation of a fixed prompt
against the source, tied embeddings, the special ids and chat template in the files. The export
is written to a temporary folder and renamed to ``--out_dir`` only when every check passed (or
``--force``); ``export_report.json`` in it lists every check.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer
from torch import nn

from lmforge.atomic import atomic_write_text, fsync_dir
from lmforge.checkpoint.load import load
from lmforge.checkpoint.manifest import manifest_of
from lmforge.checkpoint.store import find_checkpoint
from lmforge.config import Section
from lmforge.data.chat_template import ChatFormat
from lmforge.data.tokenizer import special_token_ids
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.interop import export_checks as checks
from lmforge.interop.export_checks import Check
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import Seq2Seq
from lmforge.models.vit import ImageClassifier

log = logging.getLogger(__name__)
LOGIT_ATOL = 1e-4  # fp32 export read back vs the source, max |logit diff|
REPORT = "export_report.json"


class ExportConfig(Section):
    checkpoint: str = Field(
        description="checkpoint folder, run folder (its latest checkpoint), "
        "Hugging Face model folder or .gguf file"
    )
    format: Literal["hf", "onnx", "gguf"] = Field(
        "hf",
        description="hf: a transformers folder; onnx: onnxruntime graphs (model.onnx, and "
        "decoder_with_past.onnx for decoders); gguf: one llama.cpp file",
    )
    out_dir: str = Field(description="folder to write; must not exist yet (or be empty)")
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = Field(
        "f16", description="gguf: tensor type of the matrices (norms and biases stay f32)"
    )
    adapter: str | None = Field(
        None,
        description="a LoRA/DoRA adapter folder to merge into --checkpoint (its base) first; "
        "the export fails if merging changes no weight",
    )
    force: bool = Field(False, description="write the export even when a check fails")


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out_dir {out}: exists and is not empty; choose a new folder (an export never "
            "overwrites files)"
        )
    return out


def _stop(found: list[Check], force: bool, what: str) -> None:
    """CheckpointError naming every failed check, unless ``force`` (then a warning)."""
    if not checks.failed(found):
        return
    lines = "; ".join(f"{c.name}: {c.detail}" for c in checks.failed(found))
    if force:
        log.warning("export: --force: writing despite failed checks (%s): %s", what, lines)
        return
    raise CheckpointError(
        f"export stopped, {len(checks.failed(found))} check(s) failed {what}: {lines}. "
        "Fix the checkpoint, or pass --force=true to write it anyway"
    )


def _load(
    cfg: ExportConfig,
) -> tuple[nn.Module, Tokenizer, ChatFormat | None, Path, list[Check]]:
    """The model to export (adapter merged), its tokenizer, its chat format (decoders; None when
    it cannot be built), the resolved checkpoint, and the checks that need only the source."""
    ckpt = find_checkpoint(cfg.checkpoint)
    manifest = manifest_of(ckpt)
    kind = manifest.kind
    if manifest.quantization:
        raise CheckpointError(
            f"{ckpt} holds {manifest.quantization} weights (lmforge compress quantize): export "
            "the float checkpoint it came from (GGUF quantizes itself: --gguf_type q8_0|q4_0)"
        )
    if kind == "adapter":
        raise CheckpointError(
            f"{ckpt} is a LoRA adapter, not a model: merge it into its base first — pass the "
            f"base as --checkpoint and this folder as --adapter (merged and checked here), or "
            f"run `lmforge merge --base BASE --adapter {ckpt} --out_dir MERGED` and export MERGED"
        )
    if kind == "image-classifier" and cfg.format != "hf":
        raise CheckpointError(
            f"{ckpt} is a ViT image classifier: lmforge exports those to --format hf "
            "(transformers' ViTForImageClassification reads it) only"
        )
    if kind == "encoder-decoder" and cfg.format != "hf":
        raise CheckpointError(
            f"{ckpt} is a T5/BART-style encoder-decoder: lmforge exports those to --format hf "
            "(transformers' AutoModelForSeq2SeqLM reads it) only"
        )
    if kind != "decoder" and cfg.format == "gguf":
        raise CheckpointError(
            f"{ckpt} is a {kind} (an encoder): GGUF holds decoder language models for "
            "llama.cpp; export it with --format onnx or --format hf"
        )
    if kind != "decoder" and cfg.adapter:
        raise ConfigError(f"--adapter: {ckpt} is a {kind}; adapters merge into decoders only")
    model, tokenizer, manifest = load(cfg.checkpoint, torch.device("cpu"))
    if isinstance(model, Decoder) and model.cfg.layers and cfg.format != "onnx":
        raise CheckpointError(
            f"{ckpt} was pruned structurally (its layers have different head/MLP sizes, "
            "model.layers), which Hugging Face and GGUF configs cannot express: export it with "
            "--format onnx"
        )
    if isinstance(model, Decoder) and model.cfg.qk_norm and cfg.format != "onnx":
        raise CheckpointError(
            f"{ckpt} normalises queries and keys (model.qk_norm), which the Hugging Face "
            "Llama/GPT-2 and GGUF formats cannot express: export it with --format onnx"
        )
    ckpt = manifest.path or ckpt  # a classifier's run folder gives its best checkpoint
    found: list[Check] = []
    fmt = None
    if isinstance(model, Decoder):
        if cfg.adapter:
            from lmforge.interop.peft import load_adapter
            from lmforge.models.lora import merge_lora

            before = {k: v.clone() for k, v in model.state_dict().items()}
            merge_lora(load_adapter(model, cfg.adapter))
            model.eval()
            found.append(checks.adapter_check(before, model))
        found += checks.special_token_checks(tokenizer, model.cfg.vocab_size or 0)
        try:
            fmt = ChatFormat.for_checkpoint(ckpt, tokenizer)
            found.append(checks.chat_template_check(fmt))
        except DataError as e:  # no template and no EOS to end ChatML turns with
            found.append(Check("chat_template", False, f"none can be built: {e}"))
    return model, tokenizer, fmt, ckpt, found


def _greedy_and_tied(source: Decoder, tokenizer: Tokenizer, back: Decoder, lossless: bool,
                     what: str) -> list[Check]:  # fmt: skip
    """Logits on the fixed prompt, its greedy continuation, and the tied head: ``back`` (the
    export read back by its reader) against ``source``."""
    ids = checks.prompt_ids(tokenizer, source.cfg.context_length)
    with torch.no_grad():
        diff = (source(torch.tensor([ids])) - back(torch.tensor([ids]))).abs().max().item()
    logit = checks.logit_check(diff, LOGIT_ATOL, what)
    if not lossless:  # rounding is the point of f16/q8_0/q4_0: report the cost
        logit = Check(logit.name, True, logit.detail + " (lossy type: reported, not required)")
    greedy = checks.greedy_check(
        checks.source_greedy(source, ids), checks.source_greedy(back, ids), lossless, what
    )
    return [logit, greedy, checks.tied_check(source, back)]


def _require(modules: tuple[str, ...], extra: str) -> None:
    """ConfigError naming the pip extra when a format's packages are missing."""
    import importlib.util

    if missing := [m for m in modules if importlib.util.find_spec(m) is None]:
        raise ConfigError(
            f"--format {extra} needs {', '.join(missing)}: pip install 'lmforge[{extra}]'"
        )


def _stop_ids(ids: dict[str, int], fmt: ChatFormat | None) -> list[int]:
    """Ids a runtime stops at, the EOS first (transformers reads the first as the EOS)."""
    stops = fmt.stop_ids() if fmt else set()
    return [ids["eos"], *sorted(stops - {ids["eos"]})] if "eos" in ids else sorted(stops)


def _gguf(model: nn.Module, tokenizer: Tokenizer, fmt: ChatFormat | None, staging: Path,
          cfg: ExportConfig) -> list[Check]:  # fmt: skip
    """``model-<type>.gguf``, read back by lmforge's GGUF reader (the same dequantization as
    transformers' loader, tests/interop/test_gguf_export.py)."""
    _require(("gguf",), "gguf")
    from gguf import GGUFReader

    from lmforge.interop.gguf import load_gguf
    from lmforge.interop.gguf_export import write_gguf

    assert isinstance(model, Decoder)
    staging.mkdir(parents=True)
    path = staging / f"model-{cfg.gguf_type}.gguf"
    template = fmt.template if fmt else None
    write_gguf(model, tokenizer, template, path, cfg.gguf_type, name=Path(cfg.checkpoint).name)
    back, back_tok = load_gguf(path)
    fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    declared = {r: fields.get(f"tokenizer.ggml.{k}_token_id")
                for r, k in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}  # fmt: skip
    found = [
        checks.metadata_check("special_ids", special_token_ids(tokenizer),
                              {r: i for r, i in declared.items() if i is not None}, path.name),
        checks.metadata_check("chat_template_written", template,
                              fields.get("tokenizer.chat_template"), path.name),
        checks.metadata_check("tokenizer_round_trip", tokenizer.encode(checks.PROMPT).ids,
                              back_tok.encode(checks.PROMPT).ids if back_tok else None, path.name),
    ]  # fmt: skip
    return found + _greedy_and_tied(
        model, tokenizer, back, cfg.gguf_type == "f32", f"{path.name} via lmforge's GGUF reader"
    )


def _hf(model: nn.Module, tokenizer: Tokenizer, fmt: ChatFormat | None, staging: Path,
        cfg: ExportConfig) -> list[Check]:  # fmt: skip
    """A transformers folder (with the chat template and every stop id), read back by lmforge's
    Hugging Face reader, which finds special tokens as transformers does."""
    if isinstance(model, ImageClassifier):  # ViTForImageClassification (interop/hf_vit.py)
        from lmforge.interop.hf_vit import export_hf_vit

        export_hf_vit(model, staging)
        back = load(staging)[0]
        c = model.cfg
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, c.num_channels, c.image_size, c.image_size, generator=g)
        with torch.no_grad():
            diff = float((model(images) - back(images)).abs().max())
        return [Check("hf logits", diff <= 1e-4, f"max |logit diff| {diff:.2e} after reading the "
                      "folder back (random images)")]  # fmt: skip
    if isinstance(model, Seq2Seq):  # T5/BART: AutoModelForSeq2SeqLM reads it
        from lmforge.interop.hf_seq2seq import export_hf_seq2seq

        export_hf_seq2seq(model, tokenizer, staging)
        back = load(staging)[0]
        src = torch.randint(
            0, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)
        )
        tgt = torch.randint(
            0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            diff = float((model(src, tgt) - back(src, tgt)).abs().max())
        return [Check("hf logits", diff <= 1e-4, f"max |logit diff| {diff:.2e} after reading the "
                      "folder back (random source/target ids)")]  # fmt: skip
    if not isinstance(model, Decoder):
        from lmforge.interop.hf_bert import export_hf_bert
        from lmforge.models.encoder import Encoder, SequenceClassifier

        if not isinstance(model, Encoder | SequenceClassifier):
            raise CheckpointError(
                f"{cfg.checkpoint}: a {type(model).__name__} has no Hugging Face export in "
                "lmforge yet; export it with --format onnx"
            )

        try:
            export_hf_bert(model, tokenizer, staging)  # type: ignore[arg-type]
        except ValueError as e:  # what BERT cannot express (mean pooling, a token head)
            raise CheckpointError(f"{cfg.checkpoint}: {e}; export it with --format onnx") from None
        back = load(staging)[0]
        return [_encoder_parity(model, lambda *a: back(*a).detach().numpy(), "lmforge's HF reader")]
    from lmforge.interop.hf import declared_special_tokens, export_hf, load_hf

    try:
        export_hf(model, tokenizer, staging)
    except ValueError as e:  # what Hugging Face cannot express
        raise CheckpointError(f"{cfg.checkpoint}: {e}") from None
    tok_config = json.loads((staging / "tokenizer_config.json").read_text(encoding="utf-8"))
    if fmt is not None:
        tok_config["chat_template"] = fmt.template
    atomic_write_text(staging / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    ids = special_token_ids(tokenizer)
    stops = _stop_ids(ids, fmt)
    generation = dict(
        eos_token_id=stops, **{f"{k}_token_id": i for k, i in ids.items() if k != "eos"}
    )
    atomic_write_text(staging / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    back, back_tok = load_hf(staging)
    assert back_tok is not None
    found = [
        checks.metadata_check(
            "special_ids",
            ids,
            declared_special_tokens(staging, back_tok),
            "tokenizer_config.json / generation_config.json",
        ),
    ]
    if fmt is not None:
        back_fmt = ChatFormat.for_checkpoint(staging, back_tok)
        found.append(checks.metadata_check("chat_template_written", fmt.template,
                                           back_fmt.template, "tokenizer_config.json"))  # fmt: skip
    return found + _greedy_and_tied(model, tokenizer, back.eval(), True, "lmforge's HF reader")


def _encoder_parity(model: nn.Module, run: Any, what: str) -> Check:
    """Random ids with one padded row: ``run(ids, types, mask)`` → numpy, against eager."""
    enc = getattr(model, "encoder", model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, enc.cfg.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    with torch.no_grad():
        ref = model(ids, types, mask).numpy()
    diff = float(np.abs(run(ids, types, mask) - ref).max())
    return checks.logit_check(diff, LOGIT_ATOL, what)


def _onnx(model: nn.Module, tokenizer: Tokenizer, fmt: ChatFormat | None, staging: Path,
          cfg: ExportConfig) -> list[Check]:  # fmt: skip
    """The graphs, the tokenizer and what a consumer needs to feed them, run by onnxruntime."""
    _require(("onnx", "onnxscript", "onnxruntime"), "onnx")
    from lmforge.interop import onnx as ox

    staging.mkdir(parents=True)
    atomic_write_text(staging / "tokenizer.json", tokenizer.to_str(pretty=True))
    if not isinstance(model, Decoder):
        ox.export_encoder_onnx(model, staging)
        sess = ox.session(staging / ox.ENCODER)

        def run(ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
            feeds = dict(input_ids=ids.numpy(), attention_mask=mask.numpy(),
                         token_type_ids=types.numpy())  # fmt: skip
            return sess.run(None, feeds)[0]

        ox.write_onnx_config(staging, dict(kind=type(model).__name__, graphs=[ox.ENCODER]))
        return [_encoder_parity(model, run, "onnxruntime " + ox.ENCODER)]
    c = model.cfg
    ids = special_token_ids(tokenizer)
    tok_config = {f"{k}_token": tokenizer.id_to_token(i) for k, i in ids.items()}
    tok_config |= dict(
        chat_template=fmt.template if fmt else None, model_max_length=c.context_length
    )
    atomic_write_text(staging / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    ox.export_decoder_onnx(model, staging)
    info = dict(kind="decoder", graphs=[ox.FULL, ox.WITH_PAST], n_layer=c.n_layer,
                n_kv_head=c.kv_heads, head_dim=c.d_model // c.n_head, vocab_size=c.vocab_size,
                context_length=c.context_length, stop_ids=_stop_ids(ids, fmt),
                **{f"{k}_token_id": i for k, i in ids.items()})  # fmt: skip
    ox.write_onnx_config(staging, info)
    # random ids, two rows: the full graph against eager
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, c.vocab_size or 1, (2, min(16, c.context_length)), generator=g)
    with torch.no_grad():
        ref = model(rand).numpy()
    full = ox.session(staging / ox.FULL).run(None, {"input_ids": rand.numpy()})[0]
    found = [
        checks.logit_check(float(np.abs(full - ref).max()), LOGIT_ATOL, "onnxruntime " + ox.FULL)
    ]
    prompt = checks.prompt_ids(tokenizer, c.context_length)
    mine = ox.onnx_greedy(ox.session(staging / ox.WITH_PAST), prompt, checks.N_TOKENS, c.n_layer,
                          c.kv_heads, c.d_model // c.n_head)  # fmt: skip
    source = checks.source_greedy(model, prompt)
    return found + [checks.greedy_check(source, mine, True, "onnxruntime " + ox.WITH_PAST)]


def export(cfg: ExportConfig) -> Path:
    """Check, write to a temporary folder, check what was written, rename to ``cfg.out_dir``."""
    out = _out_dir(cfg.out_dir)
    model, tokenizer, fmt, ckpt, found = _load(cfg)
    _stop(found, cfg.force, "on the source")
    staging = out.parent / f".tmp-export-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-export
    try:
        write = {"gguf": _gguf, "onnx": _onnx, "hf": _hf}[cfg.format]
        found += write(model, tokenizer, fmt, staging, cfg)
        report = dict(source=str(ckpt), format=cfg.format, adapter=cfg.adapter,
                      gguf_type=cfg.gguf_type if cfg.format == "gguf" else None,
                      checks=[c.as_dict() for c in found])  # fmt: skip
        atomic_write_text(staging / REPORT, json.dumps(report, indent=2) + "\n")
        for c in found:
            log.info("export check %-16s %s  %s", c.name, "ok  " if c.ok else "FAIL", c.detail)
        _stop(found, cfg.force, "on the written files")
        fsync_dir(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
