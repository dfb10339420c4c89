"""Post-training quantization of lmforge's own modules with torchao (module surgery, in place).

    quantize_model(model, "int8-weight-only")   # every nn.Linear's weight → torchao Int8Tensor

Methods (all run on this CPU with torchao 0.18):

    int8-dynamic      int8 weights (per output channel) and int8 activations quantized per
                      token at run time (``Int8DynamicActivationInt8WeightConfig``)
    int8-weight-only  int8 weights per output channel, activations stay float
                      (``Int8WeightOnlyConfig``)
    int4-weight-only  int4 weights in groups of ``group_size`` input channels, asymmetric
                      (``IntxWeightOnlyConfig(torch.int4, PerGroup)``): torchao's
                      ``Int4WeightOnlyConfig`` needs CUDA/XPU kernels or the ``mslk`` package,
                      the Intx path dequantizes on the CPU

What is quantized: the linear layers of the blocks (attention q/k/v and output, the MLP) and
the classifier heads; the output head only when it is not tied to the token embedding (a
tied head would need a second, quantized copy of the embedding). Embeddings and norms stay
float. How the weights are stored is ``checkpoint/quantized.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lmforge.checkpoint.quantized import quiet_torchao

Method = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"]
METHODS: tuple[str, ...] = ("int8-dynamic", "int8-weight-only", "int4-weight-only")


def torchao_config(method: Method, group_size: int = 32) -> object:
    """The torchao ``quantize_`` config of ``method``."""
    with quiet_torchao():
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup

    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if method == "int4-weight-only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")


def quantizable(model: nn.Module, group_size: int) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_model`` converts (see the module doc).

    int4 groups split the input channels, so a layer whose input width is not a multiple of
    ``group_size`` is left in float (reported by the recipe)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32:
            continue
        if name == "lm_head" and tied:
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, method: Method, group_size: int = 32) -> list[str]:
    """Quantize ``model``'s linear layers in place (fp32 weights, CPU); returns their names.

    Weights become torchao tensor subclasses (no gradient); ``model(x)`` runs as before."""
    with quiet_torchao():
        from torchao.quantization import quantize_

    names = set(quantizable(model, group_size))
    if method == "int4-weight-only":
        names = {n for n in names if model.get_submodule(n).in_features % group_size == 0}
    if not names:
        raise ValueError("the model has no float32 linear layer to quantize")
    config = torchao_config(method, group_size)
    with torch.no_grad():
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return sorted(names)


def is_quantized(model: nn.Module) -> bool:
    """Does any parameter hold a torchao tensor subclass?"""
    return any(type(p.data) is not torch.Tensor for p in model.parameters())
