"""Decoder invariants: causality, KV-cache equivalence, GQA, init, counts, overfitting."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.decoder import Decoder, DecoderConfig, token_loss_sum


def tiny(arch: str, **kw) -> DecoderConfig:
    base = dict(arch=arch, vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32)
    if arch == "llama":
        base["n_kv_head"] = 2
    return DecoderConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causality_future_tokens_do_not_change_past_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = Decoder(tiny(arch)).eval()
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 97, (2, 9))  # change every token from position 15 on
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3  # and the future did change


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_prefill_and_decode_equal_full_forward(arch: str) -> None:
    torch.manual_seed(0)
    model = Decoder(tiny(arch)).eval()
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_caches(3)
        parts = [model(x[:, :11], 0, caches), model(x[:, 11:14], 11, caches)]
        parts += [model(x[:, t : t + 1], t, caches) for t in range(14, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_arch_defaults_fill_components_and_can_be_overridden() -> None:
    g = tiny("gpt2")
    assert (g.positions, g.norm, g.mlp, g.bias, g.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    ll = tiny("llama", tie_embeddings=True)
    assert (ll.positions, ll.norm, ll.mlp, ll.bias, ll.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        True,
    )


def test_invalid_head_config_names_the_keys() -> None:
    with pytest.raises(ValueError, match="n_head"):
        DecoderConfig(d_model=30, n_head=4, vocab_size=10)
    with pytest.raises(ValueError, match="n_kv_head"):
        DecoderConfig(d_model=32, n_head=4, n_kv_head=3, vocab_size=10)


def test_tied_embeddings_share_one_tensor_and_param_count() -> None:
    m = Decoder(tiny("gpt2"))
    assert m.lm_head.weight is m.tok_emb.weight
    cfg = m.cfg
    d, L, V, T = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.context_length
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert m.num_params() == V * d + T * d + L * per_block + 2 * d
    assert m.num_params(non_embedding=True) == L * per_block + 2 * d
    assert m.flops_per_token() == 6 * (L * per_block + 2 * d + V * d) + 12 * L * T * d


def test_gpt2_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    m = Decoder(tiny("gpt2", n_layer=8, d_model=256, n_head=4))
    proj = m.blocks[0].mlp.proj.weight.std().item()
    fc = m.blocks[0].mlp.fc.weight.std().item()
    assert abs(fc - 0.02) < 0.002 and abs(proj - 0.02 / 4) < 0.001  # 1/sqrt(2·8) = 1/4
    xavier = Decoder(tiny("gpt2", init="xavier"))
    assert xavier.blocks[0].mlp.fc.weight.std().item() > 0.05


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_model_overfits_one_batch(arch: str) -> None:
    torch.manual_seed(0)
    model = Decoder(tiny(arch))
    x = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss_sum, n = token_loss_sum(model(x[:, :-1]), x[:, 1:])
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_activation_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = Decoder(tiny("llama"))
    x = torch.randint(0, 97, (2, 16))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        loss_sum, n = token_loss_sum(model(x[:, :-1]), x[:, 1:])
        (loss_sum / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing = "full"  # selective: tests/train/test_checkpointing.py
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_too_long_sequence_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="context_length"):
        Decoder(tiny("gpt2"))(torch.zeros(1, 33, dtype=torch.long))
