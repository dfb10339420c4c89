"""eval_mode: eval + no autograd inside, the training flag restored after, even on an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.eval.mode import eval_mode


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_restores_the_flag_even_on_error(was_training: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(was_training)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training and not model[1].training
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        raise RuntimeError("boom")
    assert model.training == was_training and model[1].training == was_training
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_eval_mode_for_generation_is_inference_mode() -> None:
    model = nn.Linear(2, 2).train()
    with eval_mode(model, inference=True):
        assert torch.is_inference_mode_enabled() and not model.training
    assert not torch.is_inference_mode_enabled() and model.training


def test_eval_mode_with_grad_differentiates_without_dropout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9)).train()
    x = torch.ones(1, 4)
    with eval_mode(model, grad=True):
        assert torch.is_grad_enabled()
        a, b = model(x), model(x)
        a.sum().backward()
    assert torch.equal(a, b) and model[0].weight.grad is not None and model.training


class NotedTrain(nn.Linear):
    """A module with its own train(), which notes each call."""

    calls: list[bool]

    def train(self, mode: bool = True) -> NotedTrain:
        self.__dict__.setdefault("calls", []).append(mode)
        return super().train(mode)


def test_eval_mode_restores_each_module_own_flag_and_calls_own_train() -> None:
    # a frozen part inside a training model stays frozen afterwards (model.train(True)
    # would have switched it back on)
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    model[0].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[0].training
    # a module that overrides train() is switched through it, both ways
    model = nn.Sequential(nn.Linear(2, 2), NotedTrain(2, 2)).train()
    model[1].calls = []
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and model[1].calls == [False, True]
