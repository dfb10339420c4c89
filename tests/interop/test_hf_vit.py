"""ViT ↔ Hugging Face ViTForImageClassification: logits parity in, export reloads equal,
damaged folders are clear errors."""

import json

import pytest
import torch

import lmforge
from lmforge.errors import CheckpointError
from lmforge.interop.hf_vit import export_hf_vit, load_hf_vit

transformers = pytest.importorskip("transformers")


def hf_tiny(folder, **kw):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=8, patch_size=2, num_channels=3, num_labels=5,
        id2label={i: f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)}, **kw,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    return model


def test_hf_vit_loads_with_equal_logits(tmp_path):
    hf = hf_tiny(tmp_path / "hf")
    model, tokenizer, manifest = lmforge.load(tmp_path / "hf", expect="image-classifier")
    assert tokenizer is None and (manifest.kind, manifest.family) == ("image-classifier", "vit")
    assert model.cfg.labels == [f"c{i}" for i in range(5)]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expect = hf(pixel_values=x).logits
        got = model(x)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expect.argmax(-1))


def test_export_reloads_in_transformers_with_equal_logits(tmp_path):
    hf_tiny(tmp_path / "hf")
    model = load_hf_vit(tmp_path / "hf").eval()
    with torch.no_grad():  # perturb so the round trip cannot pass by reloading the source
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf_vit(model, tmp_path / "out")
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, model(x), atol=1e-5, rtol=1e-4)
    assert back.config.id2label[2] == "c2"


def test_mean_pooled_model_refuses_hf_export(tmp_path):
    hf_tiny(tmp_path / "hf")
    model = load_hf_vit(tmp_path / "hf")
    model.cfg = model.cfg.model_copy(update={"pooling": "mean"})
    with pytest.raises(ValueError, match="pooling=cls"):
        export_hf_vit(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_and_damaged_folders(tmp_path):
    hf_tiny(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf | {"hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act='relu' is not supported"):
        load_hf_vit(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf | {"num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="tensors missing"):
        load_hf_vit(tmp_path / "hf")
