"""Decoder invariants: causality, KV-cache equivalence, GQA, init, counts, overfitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


# ---- token_loss_sum: 16-bit logits take LowPrecisionCrossEntropy ------------------------------


def _upcast_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """The loss and 16-bit gradient of F.cross_entropy on an fp32 copy (the former path)."""
    x = logits.detach().requires_grad_()
    flat = x.reshape(-1, x.size(-1)).float()
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    loss.backward()
    return loss.detach(), x.grad


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of last place between two 16-bit tensors (bit patterns, sign-aware)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)  # -0 and +0 both map to 0

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_16bit_loss_equals_fp32_cross_entropy(monkeypatch, dtype, ignore_index) -> None:
    import lmforge.models.decoder as decoder

    monkeypatch.setattr(decoder, "LOSS_CHUNK_BYTES", 7 * 4 * 301)  # 7 rows: chunks with a rest
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 301) * 4).to(dtype)  # (B, T, V)
    targets = torch.randint(1, 301, (3, 17))
    targets[0, :5] = ignore_index
    targets[2, -1] = ignore_index
    ref_loss, ref_grad = _upcast_reference(logits, targets, ignore_index)
    x = logits.clone().requires_grad_()
    loss, n = token_loss_sum(x, targets, ignore_index)
    loss.backward()
    assert n == 3 * 17 - 6 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-7, atol=0)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert _ulps(x.grad, ref_grad).max() <= 1
    assert (_ulps(x.grad, ref_grad) == 0).float().mean() > 0.99
    assert (x.grad[0, :5] == 0).all() and (x.grad[2, -1] == 0).all()


def test_16bit_loss_of_an_all_ignored_batch_is_zero() -> None:
    x = torch.randn(2, 4, 50).bfloat16().requires_grad_()
    loss, n = token_loss_sum(x, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and n == 0
    assert (x.grad == 0).all()


def test_16bit_loss_of_non_contiguous_logits() -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 4, 6).bfloat16()
    logits = base.permute(1, 2, 0)  # (B, T, V), V not the fastest dimension
    targets = torch.randint(0, 64, (4, 6))
    ref_loss, ref_grad = _upcast_reference(logits, targets)
    x = logits.detach().requires_grad_()
    loss, _ = token_loss_sum(x, targets)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-7, atol=0)
    assert _ulps(x.grad, ref_grad).max() <= 1


def test_fp32_logits_keep_f_cross_entropy_exactly() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 40), torch.randint(0, 40, (2, 5))
    targets[1, 2] = -100
    ref_loss, ref_grad = _upcast_reference(logits, targets)
    x = logits.clone().requires_grad_()
    loss, _ = token_loss_sum(x, targets)
    loss.backward()
    assert torch.equal(loss, ref_loss) and torch.equal(x.grad, ref_grad)


def test_16bit_loss_saves_and_allocates_less_than_the_upcast(monkeypatch) -> None:
    """Bytes, not time: what autograd saves for backward (saved_tensors_hooks, each storage
    once) and the peak of live tensors in the loss's forward and backward (BudgetTracker; it
    counts the logits too, from their first use)."""
    import lmforge.models.decoder as decoder
    from lmforge.plan.tracker import BudgetTracker

    monkeypatch.setattr(decoder, "LOSS_CHUNK_BYTES", 64 * 4 * 2048)  # 4 chunks of 64 rows
    torch.manual_seed(0)
    B, T, V = 4, 64, 2048  # logits 1 MiB in bf16
    logits, targets = torch.randn(B, T, V).bfloat16(), torch.randint(0, V, (B, T))
    logit_bytes = logits.numel() * 2

    def measure(loss_fn) -> tuple[int, int]:
        x = logits.clone().requires_grad_()
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        tracker = BudgetTracker(2**40)
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(x, targets).backward()
        return sum(saved.values()), tracker.peak

    def upcast(x, t):
        return F.cross_entropy(x.reshape(-1, V).float(), t.reshape(-1), reduction="sum")

    old_saved, old_peak = measure(upcast)
    new_saved, new_peak = measure(lambda x, t: token_loss_sum(x, t)[0])
    assert old_saved >= 2 * logit_bytes  # the fp32 log-softmax
    assert new_saved <= logit_bytes + 16 * B * T  # the 16-bit logits + per-row targets, lse
    assert old_peak >= 7 * logit_bytes  # logits, fp32 log-softmax, two fp32 gradients
    assert new_peak <= 2.6 * logit_bytes  # logits, their 16-bit gradient, one fp32 chunk


def test_16bit_loss_under_torch_compile() -> None:
    torch.manual_seed(0)
    logits, targets = (torch.randn(2, 30, 100) * 3).bfloat16(), torch.randint(0, 100, (2, 30))
    targets[0, :7] = -100

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(x, targets)[0]

    eager, compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_e = loss_of(eager)
    loss_e.backward()
    loss_c = torch.compile(loss_of, backend="aot_eager")(compiled)  # dynamo traces the Function
    loss_c.backward()
    assert torch.equal(loss_c, loss_e) and torch.equal(compiled.grad, eager.grad)


def test_bias_groups_are_independent_and_default_to_bias() -> None:
    """q/k/v, attention output (+ LayerNorm) and MLP biases: each group its own switch (as Llama's
    attention_bias / mlp_bias and Qwen2's q/k/v), unset ones resolved from ``bias``."""
    cfg = tiny("llama", bias=True, mlp_bias=False)
    assert (cfg.bias, cfg.qkv_bias, cfg.mlp_bias) == (True, True, False)
    block = Decoder(cfg).blocks[0]
    assert block.attn.qkv.bias is not None and block.attn.proj.bias is not None
    assert all(getattr(block.mlp, n).bias is None for n in ("gate", "up", "proj"))
    cfg = tiny("gpt2", bias=False, mlp_bias=True)
    block = Decoder(cfg).blocks[0]
    assert block.attn.proj.bias is None and block.norm1.bias is None
    assert block.mlp.fc.bias is not None and block.mlp.proj.bias is not None
    assert tiny("gpt2").mlp_bias is True and tiny("llama").mlp_bias is False


def test_qk_norm_keeps_causality_and_the_cache_and_bounds_the_scores() -> None:
    """model.qk_norm: queries and keys of unit RMS per head, so no attention score exceeds
    sqrt(head_dim) whatever the weights; causal, and the KV cache gives the full forward."""
    torch.manual_seed(0)
    model = Decoder(tiny("llama", qk_norm=True)).eval()
    plain = Decoder(tiny("llama")).eval()
    plain.load_state_dict(model.state_dict())  # same weights: qk_norm adds no parameters
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(100.0)  # huge q/k: bounded by the norm anyway
    x = torch.randint(0, 97, (2, 20))
    seen: list[torch.Tensor] = []
    rope = model.blocks[0].attn.rope
    handle = rope.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_caches(2)
        parts = [model(x[:, :9], 0, caches)]
        parts += [model(x[:, t : t + 1], t, caches) for t in range(9, 20)]
    handle.remove()
    rms = seen[0].pow(2).mean(-1).sqrt()  # block 0's queries, before RoPE
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(y)[:, :12], full[:, :12], rtol=0, atol=1e-6)
        assert (plain(x) - full).abs().max() > 1e-3  # the norm does change the function
