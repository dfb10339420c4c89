"""The head fused into the loss (models/linear_cross_entropy.py): the same loss and gradients
as ``token_loss_sum`` on the head's logits, and a Decoder trains the same inside
``head_in_loss`` and is unchanged after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.decoder import Decoder, DecoderConfig, token_loss_sum
from lmforge.models.linear_cross_entropy import (
    HeadInLoss,
    chunk_rows,
    head_in_loss,
    linear_cross_entropy_sum,
)


def _case(n: int, d: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # ignored targets count nothing and get no gradient
    return h, w, y


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_equals_token_loss_of_the_logits(bf16: bool, train_head: bool) -> None:
    # 700 rows over several chunks (chunk_rows(700, 20000) = 128, the last one partial)
    h, w, y = _case(700, 24, 20000)
    assert chunk_rows(700, 20000) < 700
    out = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(train_head)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                loss, n = linear_cross_entropy_sum(hh, ww, y)
            else:
                loss, n = token_loss_sum(F.linear(hh, ww), y)
        (loss * 0.37).backward()  # a scale other than 1 reaches the saved gradients
        out.append((loss, n, hh.grad, ww.grad))
    (lf, nf, hf, wf), (lr, nr, hr, wr) = out
    assert nf == nr == int((y != -100).sum())
    assert lf.dtype == torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf, lr, rtol=1e-3 if bf16 else 1e-6, atol=0)
    torch.testing.assert_close(hf, hr, **tol)
    assert (wf is None) == (not train_head)
    if train_head:
        torch.testing.assert_close(wf, wr, **tol)


def test_no_grad_gives_only_the_loss() -> None:
    h, w, y = _case(50, 8, 30)
    with torch.no_grad():
        loss, _ = linear_cross_entropy_sum(h, w, y)
    torch.testing.assert_close(loss, token_loss_sum(F.linear(h, w), y)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: the head is tied to tok_emb
def test_decoder_trains_the_same_inside_head_in_loss(arch: str) -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(arch=arch, vocab_size=97, context_length=16, n_layer=2, n_head=2,
                        d_model=32)  # fmt: skip
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    grads = []
    for fused in (False, True):
        model = Decoder(cfg)
        torch.manual_seed(1)
        model.reset_parameters()
        keys = set(model.state_dict())
        model.train()
        if fused:
            with head_in_loss(model) as loss_fn:
                assert isinstance(model.lm_head, HeadInLoss)
                assert set(model.state_dict()) == keys  # checkpoints inside fit look the same
                hidden = model(x)
                assert hidden.shape == (3, 16, 32)
                with torch.no_grad():  # evaluation inside fit still gets logits
                    assert model(x).shape == (3, 16, 97)
                loss, n = loss_fn(hidden, y)
            assert type(model.lm_head) is torch.nn.Linear  # put back
        else:
            loss, n = token_loss_sum(model(x), y)
        (loss / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_head_in_loss_leaves_other_heads_alone() -> None:
    from lmforge.models.lora import LoraConfig, apply_lora

    peft = pytest.importorskip("peft", reason="a LoRA-adapted head (the finetune extra)")
    assert peft
    cfg = DecoderConfig(arch="llama", vocab_size=50, context_length=8, n_layer=1, n_head=2,
                        d_model=16)  # fmt: skip
    model = apply_lora(Decoder(cfg), LoraConfig(rank=2, targets=["lm_head"]))
    with head_in_loss(model) as loss_fn:
        assert loss_fn is None and not isinstance(model.lm_head, HeadInLoss)
