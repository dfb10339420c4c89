"""`lmforge classify` end to end on a tiny random encoder: run folder, best checkpoint, report
and plots; early stopping on the monitored val metric; `lmforge eval` dispatches classifier
checkpoints to classification metrics and prompt files to generation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.classification import default_paths

TINY = [
    "--config=tiny_random",
    "--tokenizer_vocab=300",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.n_head=2",
    "--train.batch_size=16",
    "--train.max_steps=12",
    "--train.eval_every=6",
    "--train.save_every=6",
    "--train.log_every=3",
    "--train.num_threads=1",
    "--sched.warmup_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classify")
    # a train file without a val file: the recipe makes a stratified split
    rows = default_paths()["train"].read_text().splitlines()
    train = out / "train.csv"
    train.write_text("\n".join(rows[:401]) + "\n")
    assert (
        main(
            [
                "classify",
                f"--out_dir={out}/run",
                f"--data.train={train}",
                f"--data.test={default_paths()['test']}",
                "--class_weights=true",
                *TINY,
            ]
        )
        == 0
    )
    return out / "run"


def test_run_folder_report_and_plots(run_dir: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "tokenizer.json",
        "eval/report.json",
        "eval/report.md",
        "eval/plots/confusion.png",
        "eval/plots/roc.png",
        "eval/plots/pr.png",
        "eval/plots/calibration.png",
    ):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "eval/report.json").read_text())
    m = report["metrics"]
    assert m["n"] == 400 and 0 <= m["accuracy"] <= 1 and len(m["confusion_matrix"]) == 4
    assert len(report["worst_examples"]) == 20 and "p_true" in report["worst_examples"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_examples"] == 40 and summary["train_examples"] == 360  # 10 % stratified
    assert summary["class_balance"]["max_min_ratio"] > 1
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    assert summary["best_checkpoint"].endswith(best)
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "val_f1_macro" in e] == [6, 12]


def test_eval_dispatches_classifier_checkpoints(run_dir: Path, tmp_path: Path, capsys) -> None:
    test = default_paths()["test"]
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={test}", f"--out_dir={tmp_path}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    again = json.loads((run_dir / "eval/report.json").read_text())["metrics"]
    assert printed["accuracy"] == pytest.approx(
        again["accuracy"]
    )  # the best checkpoint, both times
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots/roc.png").is_file()


def test_early_stopping_on_the_monitored_metric(tmp_path: Path) -> None:
    # lr ~0: the val metric cannot improve after the first eval → stop at the second
    args = [*TINY, "--optim.lr=1e-12", "--train.early_stop_patience=1", "--train.max_steps=30"]
    assert (
        main(
            [
                "classify",
                f"--out_dir={tmp_path}",
                "--data.train=" + str(default_paths()["val"]),
                "--monitor=accuracy",
                *args,
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["stop_reason"] == "early stopping: no val_accuracy improvement in 1 evals"
    assert (tmp_path / "checkpoints" / "best").read_text().strip() == "step-000006"


def test_bad_column_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,a\nbye,b\n")
    assert main(["classify", f"--out_dir={tmp_path}/r", f"--data.train={bad}", *TINY]) == 1
    assert "bad.csv:2: column 'text' is missing" in capsys.readouterr().err


def test_lora_trains_only_adapters_and_head(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = ["classify", f"--out_dir={run}", "--data.train=" + str(default_paths()["val"])]
    args += [f"--data.test={default_paths()['test']}"]
    args += [*TINY, "--method=lora", "--lora.rank=4", "--train.keep_last=2"]
    assert main(args) == 0
    capsys.readouterr()  # the classify summary
    summary = json.loads((run / "summary.json").read_text())
    report = summary["trainable_parameters"]
    assert summary["method"] == "lora" and 0 < report["trainable"] < report["total"]
    first = load_file(str(run / "checkpoints/step-000006/model.safetensors"))
    last = load_file(str(run / "checkpoints/step-000012/model.safetensors"))
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    trained = {k for k in first if "lora_" in k or k.startswith("classifier.")}
    assert any("attn.qkv.lora_B" in k for k in trained) and "classifier.weight" in trained
    assert changed and changed <= trained  # the encoder's own weights did not move
    assert {k for k in trained if "lora_B" in k or "classifier" in k} <= changed
    # rank-4 adapters on qkv, proj, fc, proj of the one block + the head: that is all that trains
    d, ff, labels = 32, 128, 4
    adapters = 4 * ((d + 3 * d) + (d + d) + (d + ff) + (ff + d))
    assert report["trainable"] == adapters + d * labels + labels
    assert (run / "eval/report.json").is_file()
    # a LoRA checkpoint loads back for `lmforge eval` (adapters put on before the weights)
    test = default_paths()["test"]
    assert main(["eval", f"--checkpoint={run}", f"--data={test}", f"--out_dir={tmp_path}/e"]) == 0
    printed = json.loads(capsys.readouterr().out)
    again = json.loads((run / "eval/report.json").read_text())["metrics"]
    assert printed["accuracy"] == pytest.approx(again["accuracy"])


def test_unknown_test_label_is_found_before_training(tmp_path: Path, capsys) -> None:
    """Every split is checked before the first step (it used to surface after training)."""
    rows = default_paths()["train"].read_text().splitlines()
    train = tmp_path / "train.csv"
    train.write_text("\n".join(rows[:101]) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("text,label\nmy parcel is late,shipping\nwhat is this,refund-ish\n")
    out = tmp_path / "run"
    args = ["classify", f"--out_dir={out}", f"--data.train={train}", f"--data.test={test}", *TINY]
    assert main(args) == 1
    assert "test.csv:3: label 'refund-ish' is not one of the training labels" in (
        capsys.readouterr().err
    )
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_augmented_copies_join_the_training_set(tmp_path: Path) -> None:
    rows = default_paths()["train"].read_text().splitlines()
    train = tmp_path / "train.csv"
    train.write_text("\n".join(rows[:101]) + "\n")
    counts = []
    for copies in (0, 2):
        out = tmp_path / f"run{copies}"
        args = ["classify", f"--out_dir={out}", f"--data.train={train}", *TINY,
                "--train.max_steps=1", f"--augment.copies={copies}"]  # fmt: skip
        assert main(args) == 0
        counts.append(json.loads((out / "summary.json").read_text())["train_examples"])
    assert counts[1] == 3 * counts[0]
