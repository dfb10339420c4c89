"""The one way lmforge runs a model for evaluation: eval mode, no autograd, mode restored after.

Every scorer (``eval.lm``, ``eval.mlm``, ``eval.classification``, ``eval.generation``),
generation (``generate.py``) and the Fisher estimate of ``train.regularizers`` enter it, so
"dropout off while scoring, the training flag back afterwards, even on an exception" is
written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module, grad: bool = False) -> Iterator[nn.Module]:
    """``model.eval()`` inside, ``model.train(was_training)`` on exit; autograd off unless ``grad``.

    Without ``grad`` the block runs under ``torch.inference_mode`` (no version counters, no
    graph: the fastest way to run a forward); tensors made inside cannot enter autograd later,
    which no scorer needs. ``grad=True`` is for estimates that differentiate in eval mode
    (EWC's Fisher: gradients without dropout noise).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(not grad):
            yield model
    finally:
        model.train(was_training)
