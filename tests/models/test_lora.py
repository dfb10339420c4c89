"""LoRA/DoRA/QLoRA surgery (PEFT-format files: tests/interop/test_peft.py): merged equals unmerged; freezing trains only what it says; a bf16 frozen base
trains bit for bit as the fp32 one under bf16 autocast and merges in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.lora import (
    LoraConfig,
    apply_lora,
    bf16_frozen_base,
    freeze,
    merge_lora,
    quantize_nf4,
    trainable_report,
)

peft = pytest.importorskip("peft", reason="adapters are peft's LoRA layers (the finetune extra)")

ATOL = 1e-5


def tiny(arch: str = "llama", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        arch=arch,
        vocab_size=64,
        context_length=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if arch == "llama" else None,
        d_model=32,
    )
    return Decoder(cfg).eval()


def randomise_adapters(model: Decoder) -> None:
    """LoRA's B starts at zero (a no-op); random values make the parity tests bite."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2) if "magnitude" not in name else p.mul_(1.3)


X = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_unmerged(dora: bool) -> None:
    model = apply_lora(tiny(), LoraConfig(rank=4, alpha=8), dora=dora)
    randomise_adapters(model)
    before = model(X)
    merge_lora(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
    torch.testing.assert_close(model(X), before, atol=ATOL, rtol=0)
    assert set(model.state_dict()) == set(tiny().state_dict())  # a plain checkpoint again


def test_only_adapters_train_and_report() -> None:
    model = apply_lora(tiny(), LoraConfig(rank=4, alpha=8, targets=["attn.qkv"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "attn.qkv" in n for n in names)
    rep = trainable_report(model)
    assert rep["trainable"] == 2 * (4 * 32 + 64 * 4)  # 2 blocks × (A 4×32 + B 64×4)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(tiny(), LoraConfig(targets=["nope"]))


def test_qlora_nf4_base_trains_adapters() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA's NF4 base (the finetune extra)")
    ref = tiny()(X)
    model = apply_lora(quantize_nf4(tiny(), double_quant=True), LoraConfig(rank=4, alpha=8))
    base = model.blocks[0].attn.qkv.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    out = model(X)
    # NF4 rounding only: the logits stay close to full precision
    assert (out - ref).abs().max() < 0.5 and not torch.equal(out, ref)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_A" in n)


def test_freeze_top_blocks_and_norms() -> None:
    model = freeze(tiny(), LoraConfig(train_blocks=1, train_norms=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.1.") for n in trainable)
    model = freeze(tiny(), LoraConfig(train_blocks=0, train_norms=True))
    assert all("norm" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: biases, and a head tied to tok_emb
def test_bf16_frozen_base_trains_exactly_as_fp32_under_autocast(arch: str) -> None:
    """Autocast casts frozen weights to bf16 at every forward: storing them in bf16 changes no
    bit of the logits or of the adapters' gradients."""
    ref = apply_lora(
        tiny(arch),
        LoraConfig(
            rank=4,
            alpha=8,
            targets=[*LoraConfig().targets, "lm_head"] if arch == "llama" else LoraConfig().targets,
        ),
    )
    randomise_adapters(ref)
    new = bf16_frozen_base(copy.deepcopy(ref))
    dtypes = {n: p.dtype for n, p in new.named_parameters()}
    assert dtypes["blocks.0.attn.qkv.base_layer.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n)
    assert dtypes["tok_emb.weight"] == torch.float32  # a lookup (and the tied head) stays fp32
    if arch == "llama":
        assert dtypes["lm_head.base_layer.weight"] == torch.bfloat16
    else:
        assert dtypes["blocks.0.attn.qkv.base_layer.bias"] == torch.bfloat16
    out = []
    for model in (ref, new):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.train()(X)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        out.append((logits, grads))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
    with pytest.raises(ValueError, match="DoRA"):
        bf16_frozen_base(apply_lora(tiny(), LoraConfig(rank=4), dora=True))


def test_merge_into_a_bf16_frozen_base_is_done_in_fp32() -> None:
    """The fp32 update is added to the (upcast) bf16 base in fp32, not rounded into bf16."""
    model = bf16_frozen_base(apply_lora(tiny(), LoraConfig(rank=4, alpha=8)))
    randomise_adapters(model)
    layer = model.blocks[0].mlp.up
    expected = layer.get_base_layer().weight.float() + layer.get_delta_weight("default")
    merge_lora(model)
    merged = model.blocks[0].mlp.up.weight
    assert merged.dtype == torch.float32 and torch.equal(merged, expected)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # one dtype, as saved


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: biases on the frozen base
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_lora_matmuls_equal_peft_forward_and_gradients(arch: str, bf16: bool) -> None:
    """The fused layer (models/fused_lora.py) against peft's own forward on the same layers:
    logits, the input's gradient and every adapter's gradient, fp32 and under bf16 autocast."""
    from lmforge.models.fused_lora import FusedLoraLinear

    fused = apply_lora(tiny(arch), LoraConfig(rank=4, alpha=8))
    randomise_adapters(fused)
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == 2 * (
        5 if arch == "llama" else 4
    )  # qkv proj gate up proj | qkv proj fc proj
    assert all(m._fusable() == "default" for m in layers)
    plain = copy.deepcopy(fused)
    for m in plain.modules():  # the same layers, running peft's unfused forward
        if isinstance(m, FusedLoraLinear):
            m._fusable = lambda: None
    out = []
    for model in (fused, plain):
        emb = model.tok_emb.weight
        emb.requires_grad_(True)  # the input's gradient reaches the embedding
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model.train()(X)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        out.append((logits, grads))
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0][0], out[1][0], **tol)
    assert out[0][1].keys() == out[1][1].keys() and "tok_emb.weight" in out[0][1]
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], **tol, msg=n)


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply() -> None:
    """Dropout, DoRA, a merged or disabled adapter: peft's forward runs (same outputs)."""
    drop = apply_lora(tiny(), LoraConfig(rank=4, dropout=0.1))
    assert drop.blocks[0].mlp.up._fusable() is None
    dora = apply_lora(tiny(), LoraConfig(rank=4), dora=True)
    assert dora.blocks[0].mlp.up._fusable() is None
    model = apply_lora(tiny(), LoraConfig(rank=4))
    layer = model.blocks[0].mlp.up
    assert layer._fusable() == "default"
    layer.merge()
    assert layer._fusable() is None
    layer.unmerge()
    layer.enable_adapters(False)
    assert layer._fusable() is None
    layer.enable_adapters(True)
    assert layer._fusable() == "default"


def _saved_bytes_and_grads(model: Decoder, x: torch.Tensor) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd holds for backward after one forward (the
    graph kept alive by the loss), and the adapters' gradients of that step."""
    from lmforge.plan.tracker import track_peak

    model.train().zero_grad(set_to_none=True)
    with track_peak(model) as peak:
        model(x).float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return peak["Activation"], grads


def test_lean_lora_blocks_give_the_same_gradients_with_less_memory() -> None:
    """``prepare_model``'s LoRA model rebuilds its norm outputs in backward and, in plain
    LoRA, forms the SwiGLU product inside the down adapter: bit-identical gradients, and the
    saved bytes drop by what the two changes leave out (fp32, batch 4 x 32, width 32, d_ff 96:
    the three norm outputs whose input is saved anyway, and two (N, d_ff) products a block)."""
    from tests.measure import eager_lora_blocks

    from lmforge.models.lora import prepare_model

    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    lean = prepare_model(tiny(), "lora", LoraConfig(rank=4, alpha=8))
    randomise_adapters(lean)
    assert lean.rebuild_norm_outputs
    plain = eager_lora_blocks(copy.deepcopy(lean))
    lean_bytes, lean_grads = _saved_bytes_and_grads(lean, x)
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, x)
    assert lean_grads.keys() == plain_grads.keys() and lean_grads
    for n in lean_grads:
        assert torch.equal(lean_grads[n], plain_grads[n]), n
    n_tok, d, d_ff, layers = 4 * 32, 32, lean.cfg.ff_width, lean.cfg.n_layer
    norms = (2 * layers - 1) * n_tok * d * 4  # block 0's first norm: its input is kept instead
    products = 2 * layers * n_tok * d_ff * 4
    assert plain_bytes - lean_bytes == pytest.approx(norms + products, rel=0.02)
    dora = prepare_model(tiny(), "dora", LoraConfig(rank=4, alpha=8))
    assert not dora.rebuild_norm_outputs  # measured: its rebuilt outputs outlive their use
