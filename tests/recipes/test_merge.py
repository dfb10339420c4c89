"""``lmforge merge``: the adapter's recorded base is checked (a same-shaped other base is
refused unless overridden), a non-empty --out_dir is refused as by export, a corrupt
adapter_config.json is a CheckpointError naming the file (exit 2), and the merged folder equals
the unmerged model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.tiny_checkpoint import write_tiny_decoder

from lmforge.checkpoint.load import load
from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.interop.peft import read_adapter_config, save_adapter
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.recipes.merge import MergeConfig, merge

pytest.importorskip("peft", reason="LoRA adapters come from peft (the finetune extra)")


def make_base(out: Path, seed: int) -> Path:
    """A tiny lmforge checkpoint folder; bases of different seeds have the same shapes."""
    return write_tiny_decoder(out, "hello world, merge me\n" * 20, 280, 32, seed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path, torch.Tensor]:
    """(base, another base of the same shapes, adapter trained on base, its unmerged logits)."""
    root = tmp_path_factory.mktemp("merge")
    base, other = make_base(root / "base", 0), make_base(root / "other", 1)
    model, _, _ = load(base, torch.device("cpu"), expect="decoder")
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # B starts at zero: random values make the merge visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    logits = model(X)
    save_adapter(model, root / "adapter", base=str(base))
    return base, other, root / "adapter", logits.detach()


X = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))


def test_merge_onto_the_recorded_base_equals_the_unmerged_model(setup, tmp_path: Path) -> None:
    base, _, adapter, logits = setup
    out = merge(MergeConfig(base=str(base), adapter=str(adapter), out_dir=str(tmp_path / "m")))
    merged, _, _ = load(out, torch.device("cpu"), expect="decoder")
    torch.testing.assert_close(merged(X), logits, atol=1e-5, rtol=0)


def test_merge_refuses_another_base_unless_told(setup, tmp_path: Path, capsys) -> None:
    base, other, adapter, _ = setup
    args = ["merge", f"--base={other}", f"--adapter={adapter}", f"--out_dir={tmp_path / 'm'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "base_model_name_or_path" in err and str(base) in err and "allow_base_mismatch" in err
    assert not (tmp_path / "m").exists()
    assert main([*args, "--allow_base_mismatch=true"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_merge_refuses_a_non_empty_out_dir(setup, tmp_path: Path) -> None:
    base, _, adapter, _ = setup
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge(MergeConfig(base=str(base), adapter=str(adapter), out_dir=str(tmp_path / "m")))
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["keep.txt"]


def test_corrupt_adapter_config_names_the_file(setup, tmp_path: Path, capsys) -> None:
    base, _, adapter, _ = setup
    broken = tmp_path / "adapter"
    broken.mkdir()
    for f in adapter.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: not valid JSON"):
        read_adapter_config(broken)
    args = ["merge", f"--base={base}", f"--adapter={broken}", f"--out_dir={tmp_path / 'm'}"]
    assert main(args) == 2
    assert str(broken / "adapter_config.json") in capsys.readouterr().err


def test_recorded_base_matches_as_resolved_or_by_hub_name(setup, tmp_path: Path) -> None:
    """A recorded run folder means its latest checkpoint; a recorded hub id (not a path here)
    matches a local folder of the same last name; another name does not."""
    from lmforge.interop.peft import ADAPTER_CONFIG
    from lmforge.recipes.merge import check_adapter_base

    base, _, adapter, _ = setup
    copy = tmp_path / "adapter"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    conf = json.loads((copy / ADAPTER_CONFIG).read_text())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-000010")
    (run / "checkpoints" / "step-000010").symlink_to(base)
    for recorded, ok in ((str(run), True), ("org/base", True), ("org/other-model", False)):
        (copy / ADAPTER_CONFIG).write_text(json.dumps(conf | {"base_model_name_or_path": recorded}))
        if ok:
            check_adapter_base(copy, base)
        else:
            with pytest.raises(CheckpointError, match="org/other-model"):
                check_adapter_base(copy, base)
