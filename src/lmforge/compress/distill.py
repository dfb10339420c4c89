"""Knowledge distillation (Hinton et al. 2015): a student learns the teacher's distributions.

Per scored position (a next token of a decoder, an example of a classifier)::

    loss = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, y)

t, s: teacher and student logits; T: temperature (T > 1 shows the student the teacher's
ranking of the wrong answers; T² keeps the soft term's gradient on the scale of the hard one);
y: the true next token / label. With ``top_k`` the teacher keeps only its k largest logits
(what a cache of teacher outputs would hold): its distribution is renormalised over those k
and the student's full-vocabulary log-probabilities are read at the same k ids.

``TeacherSignal`` plugs this into the one training loop (``train/loop.py``'s ``fit``) without a
second loop: a forward hook on the student runs the frozen teacher on the same input (no
gradient) and keeps its logits for ``loss_fn``, which ``fit`` calls right after that forward.
The student stays a plain model, so its checkpoints are ordinary checkpoints.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TopK(NamedTuple):
    """A teacher's k largest logits per position: values and vocabulary ids, (..., k)."""

    values: torch.Tensor
    indices: torch.Tensor


def distill_loss_sum(
    student: torch.Tensor,
    teacher: torch.Tensor | TopK,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, int]:
    """(Summed loss in nats over the scored positions, their count); see the module doc.

    student: (..., V) logits; teacher: (..., V) logits or ``TopK``; y: (...) int64 targets,
    -100 where nothing is scored (those positions count in neither term). Computed in fp32.
    """
    V = student.size(-1)
    s, target = student.reshape(-1, V).float(), y.reshape(-1)
    keep = target != -100
    s, target = s[keep], target[keep]
    log_ps = F.log_softmax(s / temperature, dim=-1)  # (N, V)
    if isinstance(teacher, TopK):
        k = teacher.values.size(-1)
        t = teacher.values.reshape(-1, k)[keep].float()
        idx = teacher.indices.reshape(-1, k)[keep]
        log_pt = F.log_softmax(t / temperature, dim=-1)  # (N, k), renormalised over the top k
        log_ps = log_ps.gather(-1, idx)
    else:
        log_pt = F.log_softmax(teacher.reshape(-1, V)[keep].float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    ce = F.cross_entropy(s, target, reduction="sum") if alpha < 1 else s.new_zeros(())
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, int(keep.sum())


class TeacherSignal:
    """Runs ``teacher`` (frozen, eval mode) on every training forward of ``student`` and scores
    the student against it with ``loss_fn`` (the ``fit`` loss). In eval mode the student runs
    alone (validation loss is the student's own cross-entropy)."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        alpha: float,
        temperature: float,
        top_k: int | None = None,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k
        self._pending: torch.Tensor | TopK | None = None
        self._handle = student.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not module.training:
            return
        with torch.no_grad():
            t = self.teacher(*args, **kwargs)
        if self.top_k is not None:
            values, indices = t.topk(self.top_k, dim=-1)
            t = TopK(values, indices)
        self._pending = t

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``fit``'s ``loss_fn``: the distillation loss against the teacher's last forward."""
        teacher, self._pending = self._pending, None
        assert teacher is not None, "loss_fn called without a training forward of the student"
        return distill_loss_sum(logits, teacher, y, self.alpha, self.temperature)

    def remove(self) -> None:
        self._handle.remove()
