"""Mixed precision on CPU (the CPU equivalent of the CUDA paths), pure bf16, and torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.loop import accumulate_gradients
from lmforge.train.precision import autocast, grad_scaler, precision_error, weight_dtype

CPU = torch.device("cpu")
CFG = DecoderConfig(
    arch="llama", vocab_size=128, context_length=32, n_layer=2, n_head=4, d_model=64
)


def batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (4, 32), generator=g)
    return [(x, torch.roll(x, -1, dims=1))]


def grads(model: Decoder, precision: str) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss, _ = accumulate_gradients(model, batch(), precision, CPU)
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_bf16_autocast_matches_fp32_closely() -> None:
    torch.manual_seed(0)
    model = Decoder(CFG)
    loss32, g32 = grads(model, "fp32")
    loss16, g16 = grads(model, "bf16-mixed")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cos > 0.99  # same direction; bf16 has ~3 significant digits
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    with autocast("bf16-mixed", CPU):
        assert model(batch()[0][0]).dtype == torch.bfloat16


def test_pure_bf16_trains() -> None:
    torch.manual_seed(0)
    model = Decoder(CFG).to(weight_dtype("bf16"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = accumulate_gradients(model, batch(), "bf16", CPU)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_fp16_mixed_is_cuda_only_with_a_clear_message() -> None:
    assert "bf16-mixed" in precision_error("fp16-mixed", CPU)
    assert precision_error("bf16-mixed", CPU) is None
    assert grad_scaler("bf16-mixed", CPU) is None


def test_pretrain_rejects_fp16_on_cpu_before_any_work(tmp_path: Path) -> None:
    from lmforge.cli import resolve_config
    from lmforge.recipes.pretrain import pretrain

    cfg = resolve_config(
        "pretrain",
        None,
        {"train": {"precision": "fp16-mixed", "device": "cpu"}, "out_dir": str(tmp_path / "r")},
    )
    with pytest.raises(ConfigError, match="fp16-mixed needs a CUDA device"):
        pretrain(cfg)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_compiled_model_matches_eager() -> None:
    torch.manual_seed(0)
    model = Decoder(CFG)
    eager_loss, eager_g = grads(model, "fp32")
    compiled = torch.compile(model)
    model.zero_grad()
    loss, _ = accumulate_gradients(compiled, batch(), "fp32", CPU)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert loss.item() == pytest.approx(eager_loss, rel=1e-5)
    torch.testing.assert_close(g, eager_g, rtol=1e-4, atol=1e-6)
