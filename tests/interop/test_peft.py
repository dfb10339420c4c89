"""PEFT-format adapter files (interop/peft.py): our adapters load with peft onto the exported
Hugging Face model (fused qkv split by rows) with equal logits, adapters trained by peft on the
HF model load back exactly, and a broken adapter folder is a CheckpointError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.models.test_lora import ATOL, X, randomise_adapters, tiny

from lmforge.errors import CheckpointError
from lmforge.interop.hf import export_hf
from lmforge.interop.peft import load_adapter, read_adapter_config, save_adapter
from lmforge.models.lora import LoraConfig, apply_lora

peft = pytest.importorskip("peft", reason="adapters are peft's LoRA layers (the finetune extra)")
transformers = pytest.importorskip("transformers", reason="parity with peft on the HF export")


@pytest.mark.parametrize("arch,dora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_peft_loads_our_adapter_on_the_hf_export(arch: str, dora: bool, tmp_path: Path) -> None:
    model = tiny(arch)
    export_hf(model, None, tmp_path / "hf")
    apply_lora(model, LoraConfig(rank=4, alpha=8), dora=dora)
    randomise_adapters(model)
    ours = model(X)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(X).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # and back: the saved adapter on a fresh copy of the base gives the same logits
    again = load_adapter(tiny(arch), tmp_path / "adapter")
    torch.testing.assert_close(again(X), ours, atol=ATOL, rtol=0)


def test_adapter_trained_by_peft_on_hf_loads_exactly(tmp_path: Path) -> None:
    """Separate q/k/v adapters (different A's) fuse exactly at rank 3r."""
    model = tiny()
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
    )
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    theirs = pm.eval()(X).logits
    ours = load_adapter(model, tmp_path / "peft")
    assert ours.blocks[0].attn.qkv.lora_A["default"].weight.shape[0] == 6
    torch.testing.assert_close(ours(X), theirs, atol=ATOL, rtol=0)


def test_broken_adapter_folders_name_the_file(tmp_path: Path) -> None:
    model = apply_lora(tiny(), LoraConfig(rank=2, alpha=4))
    save_adapter(model, tmp_path / "a")
    conf = tmp_path / "a" / "adapter_config.json"
    for text, what in (
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"r": "x"}', "r must be a number"),
    ):
        conf.write_text(text)
        with pytest.raises(CheckpointError, match=f"adapter_config.json: {what}"):
            load_adapter(tiny(), tmp_path / "a")
    conf.unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        read_adapter_config(tmp_path / "a")
