"""Parameter-efficient fine-tuning as module surgery on the one Decoder: LoRA, DoRA, QLoRA, freezing.

``peft`` does the surgery (``inject_adapter_in_model`` swaps each target ``nn.Linear`` for its
LoRA layer in place; the Decoder stays a Decoder), so its maths (scaling alpha/r, DoRA's
magnitude vector, merging) is the maths Hugging Face users already trust. What lmforge adds:

- target names are lmforge's module names (``attn.qkv``, ``attn.proj``, ``mlp.gate``, ``mlp.up``,
  ``mlp.proj``, ``mlp.fc``);
- adapter files (PEFT's format, Hugging Face names, fused ``qkv`` split by rows) are read and
  written by ``interop/peft.py``: this module is only surgery on the model;
- QLoRA: the frozen base Linears become bitsandbytes ``Linear4bit`` (NF4, optional double
  quantisation) before the adapters go on. bitsandbytes over torchao: peft has a LoRA layer
  for bnb's Linear4bit (torchao's NF4 tensor has none in peft), and bnb 0.50 runs NF4
  forward and backward on CPU as well as CUDA;
- freezing (train only the top-k blocks, and/or the norms) and a trainable-parameter report.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field
from torch import nn

from lmforge.config import Section
from lmforge.models.decoder import Decoder

M = TypeVar("M", bound=nn.Module)


class LoraConfig(Section):
    """Adapters (lora, dora, qlora) and freezing options of a fine-tune."""

    rank: int = Field(16, gt=0, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] = Field(
        ["attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.proj", "mlp.fc"],
        description="module names (suffixes) that get adapters; absent ones are ignored",
    )
    double_quant: bool = Field(True, description="QLoRA: quantise the NF4 scales too")
    train_blocks: int | None = Field(
        None, ge=0, description="freeze: train only the top-k blocks (null = all)"
    )
    train_norms: bool = Field(True, description="freeze: norms stay trainable")
    train_embeddings: bool = Field(False, description="freeze: embeddings/head stay trainable")


class _NoHubKernelHint(logging.Filter):
    """bitsandbytes (imported by peft) warns on CPUs with AVX512-BF16 that it could not fetch a
    faster NF4 kernel from the Hugging Face Hub (the ``kernels`` package). lmforge never
    downloads code at run time, and bitsandbytes falls back to its own CPU kernel: the hint
    would only tell users to do what lmforge forbids."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelHint())


def _require(module: str) -> Any:
    """Import an optional fine-tuning dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is needed for LoRA/DoRA/QLoRA: pip install 'lmforge[finetune]'"
        ) from None


def _peft_config(cfg: LoraConfig, model: nn.Module, dora: bool, **extra: Any):
    peft = _require("peft")

    names = [name for name, _ in model.named_modules()]
    targets = [t for t in cfg.targets if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError(f"lora.targets {cfg.targets} match no module of this model")
    conf = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=dora,
        bias="none",
        **extra,
    )
    # Plain Linear bases get peft's layer with fused matmuls (models/fused_lora.py). Only when
    # every target is one: the mapping is by isinstance, and bitsandbytes' Linear4bit (QLoRA)
    # subclasses nn.Linear but needs peft's own bnb layer.
    hits = [
        m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
    ]
    if hits and all(type(m) is nn.Linear for m in hits):
        from lmforge.models.fused_lora import FusedLoraLinear

        conf._register_custom_module({nn.Linear: FusedLoraLinear})
    return conf


def apply_lora(model: M, cfg: LoraConfig, dora: bool = False, **peft_extra: Any) -> M:
    """Put LoRA (or DoRA) adapters on ``cfg.targets`` in place; only adapters stay trainable.

    Any module whose Linears carry the target names works: a ``Decoder``, or an encoder
    classifier (``lmforge classify``, which then unfreezes its head itself)."""
    peft = _require("peft")

    peft.inject_adapter_in_model(_peft_config(cfg, model, dora, **peft_extra), model)
    model.lora_config = cfg  # remembered for save_adapter
    model.lora_dora = dora
    return model


def quantize_nf4(model: Decoder, double_quant: bool = True, compute_dtype=torch.float32) -> Decoder:
    """QLoRA's frozen base: every Linear inside the blocks becomes a bitsandbytes NF4 Linear4bit.

    Embeddings, norms and the output head stay in full precision (as in the QLoRA paper's
    recipe, where the head is small next to the blocks only for big models; here it keeps
    exact logits scale). Call before ``apply_lora``.
    """
    bnb = _require("bitsandbytes")

    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                module.weight.data.to("cpu"),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=double_quant,
            )
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            device = module.weight.device
            q = q.to(device)  # quantises on this move (bnb quantises when the layer is moved)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, q)
    return model


def bf16_frozen_base(model: M) -> M:
    """For bf16-mixed training of LoRA: store the frozen base Linears in bfloat16, in place.

    Under bf16 autocast every ``F.linear`` casts its weight and bias to bf16 at each forward
    (round to nearest even, as ``.to(torch.bfloat16)`` does), so storing the frozen ones in bf16
    gives the very same matmuls, forward and backward, with half their bytes and no cast kernels
    per step. Changed: every plain ``nn.Linear`` whose weight does not train, the output head
    included. Unchanged: trainable weights (the adapters keep their fp32 master copy for the
    optimizer), embeddings (a lookup, which autocast leaves in fp32), norms, and a head tied to
    the input embedding.

    The model then runs only under bf16 autocast (``train.precision.autocast``): outside it an
    fp32 activation would meet a bf16 weight. For the same reason peft's cast of a bf16 input up
    to the fp32 adapter is switched off (``cast_input_dtype_enabled``, see
    ``peft.helpers.disable_input_dtype_casting``): autocast casts it straight back, exactly (a
    bf16 → fp32 → bf16 round trip), so the copies only cost time.

    LoRA only: DoRA divides by the norm of the base weight plus the update, an fp32
    computation on the stored weight itself (not an autocast matmul), which a bf16 base would
    change slightly.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(m.use_dora.get("default") for m in layers):
        raise ValueError("bf16_frozen_base is for LoRA; DoRA reads its base weight in fp32")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        frozen = not any(p.requires_grad for p in module.parameters())
        if type(module) is nn.Linear and frozen and id(module.weight) not in embeddings:
            module.to(torch.bfloat16)
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    model.bf16_frozen_base = True  # merge_lora merges in fp32
    return model


def freeze(model: Decoder, cfg: LoraConfig) -> Decoder:
    """The "incremental" strategy: only the top ``train_blocks`` blocks (and norms if asked) train."""
    k = cfg.train_blocks if cfg.train_blocks is not None else len(model.blocks)
    trainable_blocks = set(range(len(model.blocks) - k, len(model.blocks)))
    for name, p in model.named_parameters():
        parts = name.split(".")
        in_block = parts[0] == "blocks" and int(parts[1]) in trainable_blocks
        is_norm = "norm" in name
        is_emb = name.startswith(("tok_emb", "pos_emb", "lm_head"))
        p.requires_grad = (
            in_block or (is_norm and cfg.train_norms) or (is_emb and cfg.train_embeddings)
        )
    return model


def trainable_report(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (distinct tensors; NF4 weights count their elements)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # NF4 packs two weights a byte
        total += n
        trainable += n if p.requires_grad else 0
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100.0 * trainable / max(1, total),
    }


def merge_lora(model: Decoder) -> Decoder:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back.

    A ``bf16_frozen_base`` model is merged in fp32: its merged weights are the bf16-rounded
    base plus the update (``lmforge finetune`` merges into the base re-read from disk instead).
    """
    from peft.tuners.lora import LoraLayer

    if getattr(model, "bf16_frozen_base", False):
        # Back to fp32, the dtype of the adapters and of the rest of this model, before the
        # merge: peft would add the fp32 update into a bf16 weight and round most of it away.
        model.float()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"{name}: its base is {type(base).__name__} (QLoRA); merge the saved adapter "
                    "into the full-precision base: lmforge merge --base BASE --adapter DIR"
                )
            module.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, base)
    for p in model.parameters():
        p.requires_grad = True
    for attr in ("lora_config", "lora_dora", "bf16_frozen_base"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


Method = Literal["full", "lora", "dora", "qlora", "freeze"]


def prepare_model(model: Decoder, method: Method, cfg: LoraConfig) -> Decoder:
    """The model a fine-tune trains, after the surgery its ``method`` needs."""
    if method == "full":
        return model
    if method == "freeze":
        return freeze(model, cfg)
    if method == "qlora":
        quantize_nf4(model, cfg.double_quant)
    model = apply_lora(model, cfg, dora=method == "dora")
    # The norms' outputs only feed adapters now: backward rebuilds them (Block.forward).
    # Measured for plain LoRA only (tests/models/test_lora.py); with DoRA's and QLoRA's peft
    # forwards the rebuilt outputs outlive their use and the peak grows.
    model.rebuild_norm_outputs = method == "lora"
    return model
