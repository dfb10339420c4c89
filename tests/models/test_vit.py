"""The ViT family: shapes, the patch embedding is a per-patch Linear, bidirectional attention,
mean pooling, soft-label loss, config validation."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmforge.models.vit import ImageClassifier, ViTConfig, vit_base_16, vit_digits


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=8, patch_size=4, num_channels=3, n_layer=2, n_head=2, d_model=16)
    return ViTConfig(**(base | dict(dropout=0.0) | kw))


def test_shapes_and_presets():
    torch.manual_seed(0)
    model = ImageClassifier(tiny(num_labels=5)).eval()
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 5)
    assert model.vit(torch.randn(2, 3, 8, 8)).shape == (2, 1 + 4, 16)
    assert vit_digits().n_patches == 16
    assert vit_base_16().n_patches == 196


def test_patch_embedding_is_a_linear_per_patch():
    torch.manual_seed(0)
    model = ImageClassifier(tiny())
    images = torch.randn(2, 3, 8, 8)
    conv = model.vit.patch_emb.proj
    # patch (row 1, col 0) = pixels [4:8, 0:4]; token index = row * grid + col = 2
    patch = images[:, :, 4:8, 0:4].reshape(2, -1)
    expect = patch @ conv.weight.reshape(16, -1).T + conv.bias
    torch.testing.assert_close(model.vit.patch_emb(images)[:, 2], expect, atol=1e-5, rtol=1e-5)


def test_every_patch_reaches_the_cls_state():
    """Bidirectional attention: changing the last patch changes the [CLS] output."""
    torch.manual_seed(0)
    model = ImageClassifier(tiny()).eval()
    a = torch.randn(1, 3, 8, 8)
    b = a.clone()
    b[:, :, 4:, 4:] += 1.0
    assert not torch.allclose(model(a), model(b))


def test_mean_pooling_averages_patch_states():
    torch.manual_seed(0)
    model = ImageClassifier(tiny(pooling="mean")).eval()
    x = torch.randn(2, 3, 8, 8)
    hidden = model.vit(x)
    expect = model.classifier(hidden[:, 1:].mean(1))
    torch.testing.assert_close(model(x), expect)


def test_soft_labels_equal_hard_labels_when_one_hot():
    model = ImageClassifier(tiny(num_labels=4))
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    hard = model.loss_sum(logits, y)
    soft = model.loss_sum(logits, F.one_hot(y, 4).float())
    torch.testing.assert_close(hard, soft)


def test_wrong_image_shape_names_the_expected_one():
    model = ImageClassifier(tiny())
    with pytest.raises(ValueError, match=r"reads \(B, 3, 8, 8\)"):
        model(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(image_size=9), "divisible by model.patch_size"),
        (dict(d_model=15), "divisible by model.n_head"),
        (dict(num_labels=3, labels=["a", "b"]), "2 names"),
    ],
)
def test_config_errors_name_the_key(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        tiny(**kw)
