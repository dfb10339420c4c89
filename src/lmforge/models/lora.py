"""Parameter-efficient fine-tuning as module surgery on the one Decoder: LoRA, DoRA, QLoRA, freezing.

``peft`` does the surgery (``inject_adapter_in_model`` swaps each target ``nn.Linear`` for its
LoRA layer in place; the Decoder stays a Decoder), so its maths (scaling alpha/r, DoRA's
magnitude vector, merging) is the maths Hugging Face users already trust. What lmforge adds:

- target names are lmforge's module names (``attn.qkv``, ``attn.proj``, ``mlp.gate``, ``mlp.up``,
  ``mlp.proj``, ``mlp.fc``);
- adapter files are written in PEFT's own format under Hugging Face names, so
  ``PeftModel.from_pretrained(<the model lmforge export wrote>, adapter_dir)`` loads them. Our
  attention has ONE fused ``qkv`` Linear where Llama has q/k/v: LoRA(A, B) on qkv equals LoRA
  on q, k and v with the same A and B split by rows ([q; k; v]), and DoRA's magnitude (one
  number per output row) splits the same way. Loading goes back: equal A's fuse to rank r;
  three different A's (an adapter trained on a Hugging Face model) fuse exactly to rank 3r
  with A = [A_q; A_k; A_v] and a block-diagonal B;
- QLoRA: the frozen base Linears become bitsandbytes ``Linear4bit`` (NF4, optional double
  quantisation) before the adapters go on. bitsandbytes over torchao: peft has a LoRA layer
  for bnb's Linear4bit (torchao's NF4 tensor has none in peft), and bnb 0.50 runs NF4
  forward and backward on CPU as well as CUDA;
- freezing (train only the top-k blocks, and/or the norms) and a trainable-parameter report.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.config import Section
from lmforge.interop.hf import GPT2_BLOCK, LLAMA_LINEARS, hf_model_type
from lmforge.models.decoder import Decoder

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
LMFORGE_CONFIG = "lmforge_lora.json"
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
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=dora,
        bias="none",
        **extra,
    )


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


# ---- PEFT-format adapter files under Hugging Face names ----------------------------------------


def _hf_modules(model: Decoder, ours: str) -> tuple[list[str], list[int], bool]:
    """lmforge module name → (HF module names, rows of each, is a GPT-2 Conv1D)."""
    cfg = model.cfg
    if ours == "lm_head":
        return ["lm_head"], [cfg.vocab_size], False
    kind = hf_model_type(cfg)
    _, i, local = ours.split(".", 2)
    if kind == "gpt2":
        return [f"transformer.h.{i}.{GPT2_BLOCK[local][0]}"], [], True
    hd = cfg.d_model // cfg.n_head
    if local == "attn.qkv":
        names = [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
        return names, [cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], False
    return [f"model.layers.{i}.{LLAMA_LINEARS[local]}"], [], False


def _adapter_tensors(model: Decoder) -> dict[str, dict[str, torch.Tensor]]:
    """{lmforge module: {"A": (r, in), "B": (out, r), "m": (out,) if DoRA}}."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            a = module.lora_A["default"].weight.detach().cpu()
            b = module.lora_B["default"].weight.detach().cpu()
            t = {"A": a, "B": b}
            if module.use_dora.get("default"):
                t["m"] = module.lora_magnitude_vector["default"].weight.detach().cpu()
            out[name] = t
    return out


def save_adapter(model: Decoder, out_dir: str | Path, base: str = "") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that peft loads onto the
    Hugging Face export of the base (``lmforge export --format hf``)."""
    cfg: LoraConfig = model.lora_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets, conv1d = {}, set(), False
    for ours, t in _adapter_tensors(model).items():
        names, rows, conv1d = _hf_modules(model, ours)
        bs = t["B"].split(rows) if len(names) > 1 else [t["B"]]
        ms = t["m"].split(rows) if "m" in t and len(names) > 1 else [t.get("m")] * len(names)
        for name, b, m in zip(names, bs, ms, strict=True):
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = t["A"].clone().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.clone().contiguous()
            if m is not None:
                tensors[f"{prefix}.lora_magnitude_vector"] = m.clone().contiguous()
            targets.add(
                name.rsplit(".", 1)[-1]
                if not name.startswith("transformer")
                else name.split(".", 3)[-1]
            )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets),
        "use_dora": bool(getattr(model, "lora_dora", False)),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "inference_mode": True,
    }
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # lmforge's own options (targets under our names, freezing) beside peft's file: peft warns
    # about unknown keys in adapter_config.json
    atomic_write_text(out / LMFORGE_CONFIG, json.dumps(cfg.model_dump(mode="json"), indent=2))
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(model: Decoder, adapter_dir: str | Path) -> Decoder:
    """Put the adapter of ``adapter_dir`` (written by ``save_adapter``, or by peft for the
    Hugging Face export of this model) onto ``model`` in place."""
    adapter_dir = Path(adapter_dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / f).is_file():
            raise FileNotFoundError(f"{adapter_dir / f}: missing; not a PEFT adapter folder")
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    hf = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    hf = {k.removeprefix("base_model.model."): v for k, v in hf.items()}
    r, alpha = conf["r"], conf["lora_alpha"]
    # Which of our modules have adapters, and the tensors of each (fused back for qkv).
    ours_t: dict[str, dict[str, torch.Tensor]] = {}
    targets = set()
    modules = ["lm_head"] + [
        f"blocks.{i}.{local}"
        for i in range(len(model.blocks))
        for local in (
            GPT2_BLOCK if hf_model_type(model.cfg) == "gpt2" else ["attn.qkv", *LLAMA_LINEARS]
        )
    ]
    for ours in modules:
        names, rows, _ = _hf_modules(model, ours)
        if f"{names[0]}.lora_A.weight" not in hf:
            continue
        A = [hf[f"{n}.lora_A.weight"] for n in names]
        B = [hf[f"{n}.lora_B.weight"] for n in names]
        M = [hf.get(f"{n}.lora_magnitude_vector") for n in names]
        if len(A) > 1 and not all(torch.equal(A[0], a) for a in A[1:]):
            a_f = torch.cat(A)  # (3r, in): three different A's → block-diagonal B, rank 3r
            b_f = torch.block_diag(*B)  # (out, 3r)
        else:
            a_f, b_f = A[0], torch.cat(B)
        t = {"A": a_f, "B": b_f}
        if M[0] is not None:
            t["m"] = torch.cat(M)
        ours_t[ours] = t
        targets.add(ours.split(".", 2)[-1] if ours != "lm_head" else "lm_head")
    if not ours_t:
        raise ValueError(f"{adapter_dir}: no adapter tensor matches this model's modules")
    own = adapter_dir / LMFORGE_CONFIG
    saved = json.loads(own.read_text()) if own.is_file() else {}
    cfg = LoraConfig(**{**saved, "rank": r, "alpha": alpha, "targets": sorted(targets)})
    # Modules whose fused rank is 3r keep the same scale: alpha' / 3r = alpha / r.
    ranks = {k: t["A"].shape[0] for k, t in ours_t.items() if t["A"].shape[0] != r}
    extra = {}
    if ranks:
        extra = dict(
            rank_pattern={f"^{k}$": v for k, v in ranks.items()},
            alpha_pattern={f"^{k}$": alpha * v / r for k, v in ranks.items()},
        )
    apply_lora(model, cfg, dora=bool(conf.get("use_dora")), **extra)
    with torch.no_grad():
        for ours, t in ours_t.items():
            layer = model.get_submodule(ours)
            layer.lora_A["default"].weight.copy_(t["A"])
            layer.lora_B["default"].weight.copy_(t["B"])
            if "m" in t:
                layer.lora_magnitude_vector["default"].weight.copy_(t["m"])
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
    return apply_lora(model, cfg, dora=method == "dora")
