"""Quantized weights in ``model.safetensors``: plain tensors plus a JSON description, no pickles.

torchao's quantized weights are tensor subclasses, which safetensors cannot store. torchao's
own safetensors support (``torchao.prototype.safetensors``, what transformers uses) splits
each one into its plain tensors and a JSON description that is rebuilt through an allow-list
of torchao classes — nothing is unpickled or imported by name from the file. For a linear
layer ``blocks.0.mlp.fc`` quantized to int8 the file holds::

    blocks.0.mlp._fc_weight_qdata       int8  (out, in)       the integer weights
    blocks.0.mlp._fc_weight_scale       fp32  (out, 1)        one scale per output channel
    blocks.0.mlp._fc_weight_zero_point  int8  (out, 1)        zero (symmetric)
    blocks.0.mlp.fc.bias                fp32  (out,)          unquantized tensors as they are

and in the safetensors header metadata, per quantized weight, its class (``Int8Tensor``),
block size, dtype and, for ``int8-dynamic``, how activations are quantized. int4 weights are
held by torchao as one int8 per value (``IntxUnpackedToInt8Tensor``); they are written two per
byte (``lmforge_int4_packed`` names them) so an int4 file is about half an int8 one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoint.store import damaged
from lmforge.errors import CheckpointError

PACKED_KEY = "lmforge_int4_packed"


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Import torchao without its import-time warnings: it tries to load its CUDA-only kernels
    (mxfp8, cutlass sm90a) and logs each failure, and registers enums that torch now says
    need no registration; none of it matters to the CPU paths used here."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401

        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without second names of a shared tensor (tied embeddings): the first
    name is kept, as ``safetensors.torch.save_model`` does; loading re-ties them."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = id(t) if type(t) is not torch.Tensor else t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (..., n) with n even → uint8 (..., n/2), two values per byte."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``."""
    lo, hi = (p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def save_quantized(model: nn.Module, path: Path) -> None:
    """Write ``model``'s weights (some quantized by torchao) to the safetensors file ``path``."""
    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {k: v.detach() for k, v in _unique_state(model).items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    packed = []
    for name, desc in metadata.items():
        if name == "tensor_names" or json.loads(desc).get("_type") != "IntxUnpackedToInt8Tensor":
            continue
        module, weight = name.rsplit(".", 1)
        key = f"{module}._{weight}_qdata"
        if json.loads(desc)["_data"]["target_dtype"]["_data"] == "int4" and (
            tensors[key].shape[-1] % 2 == 0
        ):
            tensors[key] = pack_int4(tensors[key])
            packed.append(key)
    metadata[PACKED_KEY] = json.dumps(packed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_quantized(model: nn.Module, folder: Path) -> None:
    """Load ``folder/model.safetensors`` written by ``save_quantized`` into ``model`` (built
    in float from the checkpoint's config): quantized weights replace the float ones."""
    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    path = Path(folder) / "model.safetensors"
    if problem := damaged(path):
        raise CheckpointError(f"{path} is damaged ({problem}); it cannot be read")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    if "tensor_names" not in metadata:
        raise CheckpointError(
            f"{path}: the manifest says the weights are quantized, but the file has no "
            "description of quantized tensors; the folder is damaged or mixed up"
        )
    try:
        for key in json.loads(metadata.get(PACKED_KEY, "[]")):
            tensors[key] = unpack_int4(tensors[key])
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: quantized weights cannot be rebuilt ({e})") from None
    expected = set(_unique_state(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected or leftover:
        raise CheckpointError(
            f"{path} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected | set(leftover))[:5]}"
        )
    plain = {}
    for name, tensor in state.items():
        if type(tensor) is torch.Tensor:
            plain[name] = tensor
            continue
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if getattr(module, attr).shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                f"{tuple(getattr(module, attr).shape)}"
            )
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))  # as quantize_ does
    try:
        model.load_state_dict(plain, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path} does not fit this model: {e}") from None
