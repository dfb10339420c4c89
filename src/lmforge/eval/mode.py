"""The one way lmforge runs a model for evaluation: eval mode, no autograd, mode restored after.

Every scorer (``eval.lm``, ``eval.mlm``, ``eval.classification``, ``eval.generation``),
generation (``generate.py``) and the Fisher estimate of ``train.regularizers`` enter it, so
"dropout off while scoring, the training flag back afterwards, even on an exception" is
written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module, grad: bool = False, inference: bool = False) -> Iterator[nn.Module]:
    """``model.eval()`` inside, ``model.train(was_training)`` on exit; autograd off unless ``grad``.

    ``torch.no_grad`` by default: scorers run inside the training loop, on compiled and
    FSDP-wrapped models, where tensors made under inference mode (an all-gathered parameter,
    a lazily built buffer) could later be refused by autograd. ``inference=True`` (generation:
    nothing it makes outlives a step) uses ``torch.inference_mode``, which also skips version
    counters. ``grad=True`` is for estimates that differentiate in eval mode (EWC's Fisher:
    gradients without dropout noise).
    """
    was_training = model.training
    model.eval()
    if inference:
        context = torch.inference_mode()
    else:
        context = nullcontext() if grad else torch.no_grad()
    try:
        with context:
            yield model
    finally:
        model.train(was_training)
