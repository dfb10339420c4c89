"""LoRA/DoRA adapters in PEFT's file format, under Hugging Face module names.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``PeftModel.from_pretrained(<the model lmforge export wrote>, adapter_dir)`` loads;
``load_adapter`` reads them back (or an adapter peft trained on a Hugging Face model) onto a
Decoder. Our attention has ONE fused ``qkv`` Linear where Llama has q/k/v: LoRA(A, B) on qkv
equals LoRA on q, k and v with the same A and B split by rows ([q; k; v]), and DoRA's
magnitude (one number per output row) splits the same way. Loading goes back: equal A's fuse
to rank r; three different A's fuse exactly to rank 3r with A = [A_q; A_k; A_v] and a
block-diagonal B. The surgery itself (putting adapters on, merging) is ``models/lora.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write_text
from lmforge.checkpoint.manifest import read_json_object
from lmforge.errors import CheckpointError
from lmforge.interop.hf import GPT2_BLOCK, LLAMA_LINEARS, hf_model_type
from lmforge.models.decoder import Decoder
from lmforge.models.lora import LoraConfig, apply_lora

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
LMFORGE_CONFIG = "lmforge_lora.json"


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter folder; CheckpointError names the bad file."""
    adapter_dir = Path(adapter_dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / f).is_file():
            raise CheckpointError(f"{adapter_dir / f}: missing; not a PEFT adapter folder")
    path = adapter_dir / ADAPTER_CONFIG
    conf = read_json_object(path, fix="re-save the adapter")
    for key in ("r", "lora_alpha"):
        if not isinstance(conf.get(key), int | float) or isinstance(conf.get(key), bool):
            raise CheckpointError(f"{path}: {key} must be a number, got {conf.get(key)!r}")
    return conf


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
    conf = read_adapter_config(adapter_dir)
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
        raise CheckpointError(
            f"{adapter_dir}: no adapter tensor matches this model's modules; was it trained on "
            f"another base? (its base_model_name_or_path: {conf.get('base_model_name_or_path')!r})"
        )
    own = adapter_dir / LMFORGE_CONFIG
    try:
        saved = json.loads(own.read_text(encoding="utf-8")) if own.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{own}: not valid JSON ({e}); delete it or re-save") from None
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
