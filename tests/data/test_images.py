"""Image sets (digits, .npz, class folders) and the augmentation ops: shapes, ranges, labels,
clear errors on damaged input, and the invariants of each op."""

import numpy as np
import pytest
import torch
from PIL import Image

from lmforge.data.image_augment import AugmentConfig, augment, mix
from lmforge.data.images import digits, read_images, resize, to_model_input
from lmforge.errors import DataError

OFF = dict(crop_p=0, flip_p=0, jitter_p=0, noise_p=0, randaug_p=0, mix_p=0)


def test_digits_demo_set():
    d = digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.float32
    assert d.images.min() == 0 and d.images.max() == 1
    assert d.names == [str(i) for i in range(10)] and set(d.labels) == set(range(10))


def test_npz_channels_last_uint8_and_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "d.npz", images=x, labels=np.array(["cat", "dog", "cat", "ant", "dog", "cat"])
    )
    d = read_images(tmp_path / "d.npz")
    assert d.images.shape == (6, 3, 5, 5) and d.names == ["ant", "cat", "dog"]
    np.testing.assert_allclose(d.images[1, 2], x[1, :, :, 2] / 255.0, rtol=1e-6)
    assert d.labels.tolist() == [1, 2, 1, 0, 2, 1]
    again = read_images(tmp_path / "d.npz", names=["dog", "cat", "ant"])  # a test set's ids
    assert again.labels.tolist() == [1, 0, 1, 2, 0, 1]
    with pytest.raises(DataError, match=r"classes \['ant'\] are not among"):
        read_images(tmp_path / "d.npz", names=["cat", "dog"])


@pytest.mark.parametrize(
    "arrays, msg",
    [
        (dict(x=np.full((2, 4, 4), 3.0), y=np.array([0, 1])), r"must lie in \[0, 1\]"),
        (dict(pixels=np.zeros((2, 4, 4)), y=np.array([0, 1])), "needs arrays 'images'"),
        (dict(x=np.zeros((2, 4, 4)), y=np.array([0, 1, 1])), "expected"),
        (dict(x=np.zeros((2, 4, 4), dtype=object), y=np.array([0, 1])), "readable .npz"),
    ],
)
def test_bad_npz_is_a_data_error(tmp_path, arrays, msg):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=msg):
        read_images(tmp_path / "bad.npz")


def test_other_files_are_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not a .npz"):
        read_images(tmp_path / "x.txt")


def test_class_folders_grey_and_colour(tmp_path):
    for name, value in (("10", 200), ("2", 50)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4), value + i, np.uint8), "L").save(
                tmp_path / name / f"{i}.png"
            )
    d = read_images(tmp_path)
    assert d.names == ["2", "10"]  # numeric names sort as numbers
    assert d.images.shape == (4, 1, 4, 4) and d.labels.tolist() == [0, 0, 1, 1]
    assert d.images[2, 0, 0, 0] == pytest.approx(200 / 255)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8), "RGB").save(tmp_path / "2" / "rgb.png")
    d = read_images(tmp_path)
    assert d.images.shape == (5, 3, 4, 4)  # one colour image: all RGB, resized to the first
    (tmp_path / "2" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_images(tmp_path)


def test_resize_and_normalisation():
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    assert resize(x, 16).shape == (2, 1, 16, 16)
    t = to_model_input(torch.tensor([0.0, 0.5, 1.0]))
    assert t.tolist() == [-1.0, 0.0, 1.0]


def _batch(seed=0, c=3):
    return torch.rand(16, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = _batch()
    cfg = AugmentConfig(flip_p=0.5, randaug_p=0.5, mix_p=0)
    torch.manual_seed(123)
    a = augment(x, cfg, seed=1)
    after = torch.rand(1)  # the caller's RNG stream is untouched by kornia's draws
    torch.manual_seed(123)
    b = augment(x, cfg, seed=1)
    assert torch.equal(torch.rand(1), after)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert not torch.equal(augment(x, cfg, seed=2), a)
    assert torch.equal(augment(x, AugmentConfig(**OFF), seed=0), x)
    assert torch.equal(augment(x, AugmentConfig(enabled=False), seed=0), x)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_auto_augment_policies_on_grey_and_colour(policy, channels):
    x = _batch(c=channels)
    cfg = AugmentConfig(**(OFF | dict(randaug_p=1.0)), randaug_policy=policy, randaug_magnitude=9)
    outs = [augment(x, cfg, seed=s) for s in range(4)]
    assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert sum(not torch.equal(o, x) for o in outs) >= 3  # some op changed the images


def test_flip_with_probability_one_is_a_mirror():
    x = _batch()
    out = augment(x, AugmentConfig(**(OFF | dict(flip_p=1.0))), seed=0)
    assert torch.equal(out, x.flip(-1))


def test_jitter_and_noise_change_pixels_not_geometry():
    # a left-dark/right-bright image stays left-dark/right-bright under jitter and small noise
    img = torch.zeros(32, 1, 8, 8)
    img[..., 4:] = 0.8
    cfg = AugmentConfig(**(OFF | dict(jitter_p=1.0, noise_p=1.0)), noise_std=0.02)
    out = augment(img, cfg, seed=0)
    assert not torch.equal(out, img)
    assert bool((out[..., 4:].mean((1, 2, 3)) > out[..., :4].mean((1, 2, 3)) + 0.3).all())


def test_full_crop_is_identity_and_small_crop_magnifies():
    x = _batch()
    full = AugmentConfig(**(OFF | dict(crop_p=1.0)), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    torch.testing.assert_close(augment(x, full, seed=0), x, atol=1e-5, rtol=0)
    # a quarter-area crop of a left-dark/right-bright image shows a larger share of one side
    img = torch.zeros(1, 1, 8, 8)
    img[..., 4:] = 1.0
    quarter = full.model_copy(update={"crop_scale": (0.25, 0.25)})
    out = augment(img.repeat(64, 1, 1, 1), quarter, seed=0)
    share = out.mean(dim=(1, 2, 3))
    assert ((share < 0.25) | (share > 0.75)).float().mean() > 0.3


def test_mixup_and_cutmix_targets_match_the_pixels():
    # image k is constant k, so each output pixel says which image it came from
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 8, 8) / 10
    y = torch.eye(8)
    mixed, soft = mix(x, y, AugmentConfig(mix_p=1.0, cutmix_share=0.0), seed=0)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    torch.testing.assert_close(mixed[:, 0, 0, 0], (soft @ torch.arange(8.0)) / 10)
    assert not torch.equal(mixed, x)
    pasted = 0
    for seed in range(4):
        cfg = AugmentConfig(mix_p=1.0, cutmix_share=1.0, cutmix_alpha=1.0)
        cut, soft = mix(x, y, cfg, seed=seed)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        for i in range(8):  # the label share of each source = its share of the pixels
            for k in range(8):
                pixels = (cut[i] == k / 10).float().mean()
                assert float(soft[i, k]) == pytest.approx(float(pixels), abs=1e-6)
        pasted += int((soft.max(1).values < 1).sum())
    assert pasted > 0  # some boxes were pasted (the test can fail)
    assert mix(x, y, AugmentConfig(mix_p=0.0), seed=0)[0] is x
