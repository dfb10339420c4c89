"""`lmforge classify-image` end to end on the digits with a tiny ViT: run folder, best
checkpoint, the classification report and plots, a model that learned (test accuracy well
above chance), `lmforge.load` rebuilding the exact model; `lmforge eval` on the run's test split or an .npz;
`--resume` equal to an uninterrupted run; .npz input; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.data.images import ImageDataConfig, read_splits, to_model_input

TINY = [
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.n_head=2",
    "--model.dropout=0.0",
    "--train.max_steps=80",
    "--train.eval_every=40",
    "--train.save_every=40",
    "--train.log_every=20",
    "--train.num_threads=1",
    "--sched.warmup_steps=5",
    "--optim.lr=3e-3",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classify_image") / "run"
    assert main(["classify-image", *TINY, f"--out_dir={out}"]) == 0
    return out


def test_digits_run_writes_the_report_and_learns(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_images"] == 360 and summary["labels"] == [str(i) for i in range(10)]
    assert summary["eval_accuracy"] > 0.5  # chance is 0.1
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert np.asarray(report["metrics"]["confusion_matrix"]).sum() == 360
    for png in ("confusion", "roc", "pr", "calibration"):
        assert (run_dir / "eval" / "plots" / f"{png}.png").stat().st_size > 1000
    assert any("val_accuracy" in json.loads(line) for line in (run_dir / "metrics.jsonl").open())


def test_load_rebuilds_the_best_checkpoint(run_dir: Path):
    model, tokenizer, manifest = lmforge.load(run_dir, expect="image-classifier")
    assert tokenizer is None and manifest.kind == "image-classifier"
    assert manifest.path == Path(
        json.loads((run_dir / "summary.json").read_text())["best_checkpoint"]
    )
    # the loaded model scores the test split exactly as the run's report did
    _, _, test = read_splits(ImageDataConfig())
    x = to_model_input(torch.from_numpy(test.images))
    with torch.no_grad():
        acc = float((model(x).argmax(-1).numpy() == test.labels).mean())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert acc == pytest.approx(summary["eval_accuracy"], abs=1e-9)
    assert model.cfg.labels == [str(i) for i in range(10)] and model.cfg.image_size == 8


def test_wrong_kind_for_a_text_command(run_dir: Path):
    with pytest.raises(lmforge.errors.CheckpointError, match="ViT image classifier"):
        lmforge.load(run_dir, expect="decoder")


def test_npz_input_and_resize(tmp_path: Path):
    rng = np.random.default_rng(0)
    # two classes a bright square decides: top-left (class "tl") or bottom-right ("br")
    x = (rng.random((80, 6, 6)) * 60).astype(np.uint8)
    y = np.array(["tl", "br"] * 40)
    x[y == "tl", :3, :3] += 180
    x[y == "br", 3:, 3:] += 180
    np.savez(tmp_path / "sq.npz", images=x, labels=y)
    args = [a for a in TINY if "max_steps" not in a] + ["--train.max_steps=40"]
    out = tmp_path / "run"
    code = main(["classify-image", *args, f"--data.path={tmp_path / 'sq.npz'}",
                 "--data.image_size=8", f"--out_dir={out}"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["br", "tl"] and summary["eval_accuracy"] >= 0.9


def test_bad_input_fails_with_the_reason(tmp_path: Path, capsys):
    assert main(["classify-image", f"--data.path={tmp_path / 'none.npz'}"]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["classify-image", "--model.patch_size=3", f"--out_dir={tmp_path / 'r'}"]) == 2
    assert "divisible by model.patch_size" in capsys.readouterr().err


def test_export_hf_reloads_in_transformers_with_equal_logits(run_dir: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", f"--checkpoint={run_dir}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    model, _, _ = lmforge.load(run_dir)
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-5, rtol=1e-4)
    assert hf.config.id2label[7] == "7"


def test_eval_scores_the_runs_test_split_as_the_run_did(run_dir: Path, tmp_path: Path, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["eval", f"--checkpoint={run_dir}", f"--out_dir={tmp_path / 'ev'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"].endswith("(test split)")
    for k in ("accuracy", "f1_macro", "roc_auc"):
        assert printed[k] == pytest.approx(summary[f"eval_{k}"], abs=1e-12)
    assert (tmp_path / "ev" / "report.md").is_file()
    # the same images as an .npz (uint8, so rounded): the accuracy of those pixels
    _, _, test = read_splits(ImageDataConfig())
    pixels = np.round(test.images[:, 0] * 255).astype(np.uint8)
    np.savez(tmp_path / "t.npz", images=pixels, labels=np.array(test.names)[test.labels])
    model, _, _ = lmforge.load(run_dir)
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(pixels[:, None] / np.float32(255)))
        want = float((model(x).argmax(-1).numpy() == test.labels).mean())
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={tmp_path / 't.npz'}",
                 f"--out_dir={tmp_path / 'ev2'}"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(want, abs=1e-12)
    np.savez(tmp_path / "bad.npz", images=pixels[:4], labels=np.array(["x", "y", "x", "y"]))
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={tmp_path / 'bad.npz'}"]) == 1
    assert "not among the training classes" in capsys.readouterr().err


def test_resume_equals_uninterrupted(tmp_path: Path):
    """Resumed from its step-6 checkpoint (augmentation, MixUp/CutMix and dropout on, so batch
    cursor, augmentation seeds and RNG state all matter), a run ends with the weights and test
    metrics of the run that never stopped."""
    args = [a for a in TINY if not a.startswith(("--train.", "--model.dropout"))]
    args += ["--model.dropout=0.1", "--augment.mix_p=0.5", "--augment.randaug_p=0.3",
             "--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6",
             "--train.keep_last=2", "--train.num_threads=1", "--train.batch_size=32"]  # fmt: skip
    whole = tmp_path / "whole"
    assert main(["classify-image", *args, f"--out_dir={whole}"]) == 0
    resumed = tmp_path / "resumed"  # the run as it was after step 6
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000012")
    for pointer in ("latest", "best"):
        (resumed / "checkpoints" / pointer).write_text("step-000006\n")
    shutil.rmtree(resumed / "eval")
    (resumed / "summary.json").unlink()
    # as printed on an interrupt: the run's own config.yaml, no other arguments
    step6 = resumed / "checkpoints" / "step-000006"
    assert main(["classify-image", f"--resume={step6}"]) == 0
    a = load_file(str(whole / "checkpoints" / "step-000012" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000012" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s_whole = json.loads((whole / "summary.json").read_text())
    s_resumed = json.loads((resumed / "summary.json").read_text())
    assert s_resumed["steps"] == 12
    assert s_resumed["eval_accuracy"] == s_whole["eval_accuracy"]
    assert Path(s_resumed["best_checkpoint"]).name == Path(s_whole["best_checkpoint"]).name
