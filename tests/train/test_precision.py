"""train.precision=auto: resolved once, from what the device does fast."""

from __future__ import annotations

import torch

from lmforge.train.loop import TrainConfig
from lmforge.train.precision import auto_precision


def test_auto_resolves_on_the_cpu_from_onednn_bf16_support() -> None:
    expected = "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert TrainConfig(precision="auto", device="cpu").precision == expected
    assert auto_precision(torch.device("cpu")) == expected


def test_auto_is_recorded_as_the_concrete_choice() -> None:
    """config.yaml (model_dump) holds what ran, so a resume elsewhere runs the same."""
    dumped = TrainConfig(precision="auto", device="cpu").model_dump()
    assert dumped["precision"] in ("fp32", "bf16-mixed")
    assert TrainConfig(**dumped).precision == dumped["precision"]


def test_a_concrete_precision_is_kept() -> None:
    assert TrainConfig(precision="bf16-mixed", device="cpu").precision == "bf16-mixed"
