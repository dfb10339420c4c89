"""CLI smoke runs: a micro pretrain writes the run folder of DESIGN.md; generate, eval, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, main

MICRO = [
    "--train.max_steps=12",
    "--train.eval_every=6",
    "--train.save_every=6",
    "--train.log_every=2",
    "--train.batch_size=4",
    "--train.num_threads=1",
    "--sched.warmup_steps=2",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.n_head=2",
    "--model.n_kv_head=2",
    "--model.context_length=32",
    "--data.vocab_size=300",
    "--sample.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    corpus = out / "corpus.txt"
    corpus.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    )
    assert main(["pretrain", f"--out_dir={out}", f"--data.path={corpus}", *MICRO]) == 0
    return out


def test_pretrain_writes_the_run_folder(run_dir: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "plots/loss.png",
        "plots/lr.png",
        "data/train.bin",
        "data/val.bin",
        "data/meta.json",
        "data/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000012"
    ckpt = run_dir / "checkpoints" / latest
    assert {p.name for p in ckpt.iterdir()} == {
        "manifest.json",
        "model.safetensors",
        "config.yaml",
        "tokenizer.json",
        "train_state.pt",
    }
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "loss" in e]
    evals = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in train] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= e.keys() for e in train)
    assert [e["step"] for e in evals] == [6, 12]
    assert all({"val_loss", "val_ppl", "val_bpb"} <= e.keys() for e in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["val_bpb"] == evals[-1]["val_bpb"]


def test_resume_of_a_finished_run_continues_to_new_max_steps(run_dir: Path) -> None:
    assert main(["pretrain", f"--out_dir={run_dir}", "--resume", "--train.max_steps=14"]) == 0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e][-2:] == [12, 14]


def test_generate_streams_from_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", f"--checkpoint={run_dir}", "--prompt=Line", "--max_new_tokens=5"]
    assert main([*args, "--temperature=0", f"--out_dir={run_dir / 'gen'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Line") and len(out) > len("Line\n")
    record = json.loads((run_dir / "gen" / "generation.json").read_text())
    assert out == "Line" + record["text"] + "\n"


def test_eval_on_prepared_folder_and_on_text_file(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={run_dir / 'data'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["val_bpb"] == pytest.approx(
        summary["val_bpb"], rel=1e-4
    )  # eval = training's eval
    text = run_dir / "held_out.txt"
    text.write_text("Line 9999: the quick brown fox jumps over the lazy dog.\n")
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={text}"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == len(text.read_bytes())


def test_bad_config_key_exits_2_naming_the_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--train.max_step=3"]) == 2
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in capsys.readouterr().err


def test_missing_checkpoint_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", f"--checkpoint={tmp_path / 'nope'}", "--prompt=x"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_bad_input_data_exits_1_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert main(["data", "prepare", f"--data.path={bad}", f"--out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main([*command.split(), "--help"]) == 0
    assert "--" in capsys.readouterr().out


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, check=True
    )
    assert "pretrain" in out.stdout and "data prepare" in out.stdout


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    import signal
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    )
    out = tmp_path / "run"
    args = [a for a in MICRO if not a.startswith(("--train.max_steps", "--train.save_every"))]
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "pretrain",
        f"--out_dir={out}",
        f"--data.path={corpus}",
        *args,
    ]
    proc = subprocess.Popen(
        [*cmd, "--train.max_steps=100000", "--train.save_every=100000"],
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved to" in err and "--resume" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert stopped_at >= 4
    # resume and finish a few more steps
    done = subprocess.run(
        [*cmd, "--resume", f"--train.max_steps={stopped_at + 4}", "--train.save_every=1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    steps = [
        json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 4  # no step repeated or lost
