"""The engine's forward passes equal ``Decoder.forward``: the decoding step with transposed,
fused weights (logits to float rounding, tokens exactly) and the last-position prefill."""

from __future__ import annotations

import pytest
import torch
from tests.test_generate import make_model

from lmforge.generate import SampleConfig
from lmforge.inference.engine import Engine, Request
from lmforge.inference.fast_decode import DecodeWeights, prefill_logits
from lmforge.models.decoder import Decoder
from lmforge.models.lora import LoraConfig, apply_lora


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-qk_norm"])
def model(request: pytest.FixtureRequest) -> Decoder:
    m = make_model(request.param.split("-")[0], context=48).eval()
    if request.param.endswith("qk_norm"):  # the speedrun preset's attention
        m.cfg = m.cfg.model_copy(update={"qk_norm": True})
        for block in m.blocks:
            block.attn.qk_norm = True
    with torch.no_grad():  # non-zero biases and norm gains: zeros would hide a missed one
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return m


@torch.inference_mode()
@pytest.mark.parametrize("blocks", [1, 2, 3])  # column blocks per matrix (one per thread)
def test_decode_step_equals_the_models_cached_forward(model: Decoder, blocks: int) -> None:
    """Three rows, two left-padded (own positions, hidden padding), decoded for 5 steps."""
    fast = DecodeWeights.prepare(model, blocks=blocks)
    assert fast is not None
    torch.manual_seed(1)
    B, P = 3, 9
    ids = torch.randint(0, 64, (B, P + 5))
    mask = torch.ones(B, P + 5, dtype=torch.bool)
    mask[1, :4], mask[2, :7] = False, False
    ref_caches = model.new_kv_caches(B, max_len=P + 5)
    our_caches = model.new_kv_caches(B, max_len=P + 5)
    model(ids[:, :P], 0, ref_caches, attention_mask=mask[:, :P])
    model(ids[:, :P], 0, our_caches, attention_mask=mask[:, :P])
    for t in range(P, P + 5):
        ref = model(ids[:, t : t + 1], t, ref_caches, attention_mask=mask[:, : t + 1])[:, -1]
        got = fast.decode(ids[:, t : t + 1], t, our_caches, mask[:, : t + 1])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for a, b in zip(our_caches, ref_caches, strict=True):  # the cache holds the same keys
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)
    # Unmasked rows (every row from column 0): the path of a request alone
    one = model.new_kv_caches(1, max_len=P + 1)
    model(ids[:1, :P], 0, one)
    ref_caches = model.new_kv_caches(1, max_len=P + 1)
    model(ids[:1, :P], 0, ref_caches)
    ref = model(ids[:1, P : P + 1], P, ref_caches)[:, -1]
    torch.testing.assert_close(fast.decode(ids[:1, P : P + 1], P, one), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_prefill_logits_are_the_last_positions(model: Decoder) -> None:
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :5] = False
    for m in (None, mask):
        ref = model(ids, 0, model.new_kv_caches(2, max_len=11), attention_mask=m)[:, -1]
        got = prefill_logits(model, ids, 0, model.new_kv_caches(2, max_len=11), m)
        # The same ops; only the head's matmul has fewer rows (2, not 22): rounding at most
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    with pytest.raises(ValueError, match="exceeds context_length 48"):
        prefill_logits(model, torch.zeros(1, 49, dtype=torch.long), 0, model.new_kv_caches(1))


def test_the_model_is_left_as_it_was(model: Decoder) -> None:
    """Copies, not surgery: parameter names, shapes, strides and storage are untouched."""
    before = {k: (v.shape, v.stride(), v.data_ptr()) for k, v in model.state_dict().items()}
    fast = DecodeWeights.prepare(model)
    assert fast is not None
    assert {k: (v.shape, v.stride(), v.data_ptr()) for k, v in model.state_dict().items()} == before
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(layer.qkv.weight_t.data_ptr() not in ptrs for layer in fast.layers)


def test_adapters_fall_back_to_the_models_forward() -> None:
    """A LoRA-wrapped model keeps its adapters' forward: no fast layout, same tokens."""
    model = make_model("llama", context=48)
    apply_lora(model, LoraConfig(rank=2))
    with torch.no_grad():  # non-zero adapters: a path that skipped them would differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert DecodeWeights.prepare(model) is None
    assert Engine(model)._fast is None
    sample = SampleConfig(max_new_tokens=12, temperature=0.0, top_k=None)
    requests = [Request([3, 1, 4], sample), Request([9], sample)]
    plain = make_model("llama", context=48)  # the same seed: the weights before the adapters
    with_lora = [c.token_ids for c in Engine(model).run(requests)]
    assert with_lora == [c.token_ids for c in Engine(model, fast_decode=False).run(requests)]
    assert with_lora != [c.token_ids for c in Engine(plain).run(requests)]


@pytest.mark.parametrize("fast_decode", [True, False])
def test_both_paths_give_the_same_tokens(model: Decoder, fast_decode: bool) -> None:
    sample = SampleConfig(max_new_tokens=15, temperature=0.0, top_k=None)
    requests = [Request(p, sample) for p in ([5], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8])]
    ref = Engine(model, max_batch=1, fast_decode=False).run(requests)
    got = Engine(model, max_batch=3, fast_decode=fast_decode).run(requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantized_models_fall_back_to_the_models_forward(arch: str) -> None:
    """torchao's quantized weights (``lmforge compress quantize``) keep the model's own forward;
    found by bench/compress.py: the SwiGLU gate and up were concatenated before the check."""
    pytest.importorskip("torchao", reason="quantization needs torchao")
    from lmforge.compress.quantize import quantize_model

    model = make_model(arch, context=48).eval()
    quantize_model(model, "int8-weight-only")
    assert DecodeWeights.prepare(model) is None
    sample = SampleConfig(max_new_tokens=6, temperature=0.0, top_k=None)
    requests = [Request([3, 1, 4], sample), Request([9], sample)]
    assert len(Engine(model).run(requests)[0].token_ids) == 6
