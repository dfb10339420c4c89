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


# --- the command line as users type it (hardening issue) ---------------------------------


def test_readme_generate_example_with_a_prompt_that_looks_like_yaml(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    # `lmforge generate --checkpoint runs/x --prompt "ROMEO:"` used to exit 2 ('valid string')
    for prompt in ("ROMEO:", "Hello #world", "yes"):
        args = ["generate", "--checkpoint", str(run_dir), "--prompt", prompt]
        assert main([*args, "--max_new_tokens", "3", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith(prompt)


def test_config_given_twice_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--config", "cpu_demo", "--config=gpt2_124m"]) == 2
    err = capsys.readouterr().err
    assert "--config is given 2 times ('cpu_demo', 'gpt2_124m'); give it once" in err


def test_a_value_flag_without_a_value_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--checkpoint=x", "--temperature"]) == 2
    assert "--temperature needs a value (float)" in capsys.readouterr().err


def test_chat_without_stdin_and_with_invalid_utf8_gives_one_paragraph(run_dir: Path) -> None:
    import os

    cmd = [sys.executable, "-m", "lmforge", "chat", f"--checkpoint={run_dir}"]
    cmd += ["--max_new_tokens=2"]
    # `lmforge chat <&-` used to end in AttributeError ... isatty
    closed = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=lambda: os.close(0), timeout=120,
    )  # fmt: skip
    assert closed.returncode == 2, closed.stderr
    assert "standard input" in closed.stderr and "Traceback" not in closed.stderr
    assert "Error" not in closed.stderr  # no exception type name: a sentence for people
    # bytes that are not UTF-8 used to end in TypeError (TextInputSequence must be str)
    bad = subprocess.run(cmd, input=b"hello\n\xff\xfe hi\n", capture_output=True, timeout=120)
    err = bad.stderr.decode()
    assert bad.returncode == 1, err
    assert "<stdin>:2: the input is not valid UTF-8" in err and "Traceback" not in err


def test_estimate_with_a_bad_budget_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["estimate", "--fit=lots"]) == 2  # was ValueError, exit 1
    err = capsys.readouterr().err
    assert "--fit=lots" in err and "24GiB" in err and "Traceback" not in err


def test_exit_codes_come_from_the_error_type(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import dataclasses

    from lmforge.errors import CheckpointError, DataError, LmforgeError

    class Unavailable(LmforgeError):  # a future error type: its own code, no edit in cli.py
        exit_code = 3

    for error, code in ((CheckpointError, 2), (DataError, 1), (Unavailable, 3)):

        def fail(cfg: object, error: type[Exception] = error) -> int:
            raise error("what went wrong and what to do")

        command = dataclasses.replace(COMMANDS["generate"], run=fail)
        monkeypatch.setitem(COMMANDS, "generate", command)
        assert main(["generate", "--checkpoint=x"]) == code, error
        err = capsys.readouterr().err
        assert err == "lmforge generate: what went wrong and what to do\n"


@pytest.mark.parametrize("command", ["pretrain", "finetune", "classify", "mlm"])
def test_nproc_starts_torchrun_for_every_training_command(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: started.append(cmd) or 0)
    monkeypatch.delenv("RANK", raising=False)
    assert main([command, "--nproc", "2", "--out_dir=r", "--train.max_steps=30"]) == 0
    (cmd,) = started
    assert cmd[0] == sys.executable and "--standalone" in cmd and "--nproc_per_node=2" in cmd
    tail = cmd[cmd.index("--nproc_per_node=2") + 1 :]
    assert tail == ["-m", "lmforge", command, "--out_dir=r", "--train.max_steps=30"]
    assert "starting 2 processes" in capsys.readouterr().err
    assert main([command, "--help"]) == 0 and "--nproc=N" in capsys.readouterr().out
    # a bad config fails once, before any process starts
    assert main([command, "--nproc=2", "--train.max_step=3"]) == 2 and len(started) == 1


def test_a_failed_rank_is_reported_without_torchrun_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_corpus.txt"
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "pretrain", "--nproc=2", f"--data.path={missing}",
         f"--out_dir={tmp_path / 'run'}", *MICRO],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"{missing}: no file, folder or glob match" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


def test_every_command_runs_its_recipe_through_the_one_runner(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``_Recipe``: the recipe gets the config, its result is shown (chosen keys, in order),
    ``{}`` (ranks other than 0) prints nothing, and an exit-code recipe's value is the code."""
    import types

    from lmforge.cli import _json, _Recipe

    fake = types.ModuleType("lmforge_fake_recipe")
    fake.run = lambda cfg: cfg  # type: ignore[attr-defined]
    fake.printer = lambda result: print("printed", result)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmforge_fake_recipe", fake)

    assert _Recipe("lmforge_fake_recipe", "run", show=_json("b a"))({"a": 1, "b": 2, "c": 3}) == 0
    assert list(json.loads(capsys.readouterr().out).items()) == [("b", 2), ("a", 1)]
    _Recipe("lmforge_fake_recipe", "run", show=_json("b a"))({"c": 3})
    assert capsys.readouterr().out == "{}\n"  # none of the keys: an empty object, not an error
    _Recipe("lmforge_fake_recipe", "run", show=_json())({})
    assert capsys.readouterr().out == ""  # rank > 0 returns {}: nothing to show
    _Recipe("lmforge_fake_recipe", "run", show="printer")("x")
    assert capsys.readouterr().out == "printed x\n"  # the recipe module's own printer
    assert _Recipe("lmforge_fake_recipe", "run", exit_code=True)(7) == 7
    assert _Recipe("lmforge_fake_recipe", "run")("shown by nobody") == 0
    assert capsys.readouterr().out == ""
    # every table entry names a recipe function (and printer) that its module has
    import importlib

    for name, command in COMMANDS.items():
        if isinstance(command.run, _Recipe):
            module = importlib.import_module(command.run.module)
            assert callable(getattr(module, command.run.function)), name
            if isinstance(command.run.show, str):
                assert callable(getattr(module, command.run.show)), name
        else:
            assert command.raw, f"{name}: only raw commands have their own runner"
