"""``lmforge eval`` on prepared shards refuses shards of another tokenizer (their ids index a
different vocabulary: the bits-per-byte would be wrong, not an error) and accepts the same
tokenizer however its file is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lmforge.cli import main

LINES = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
OTHER = "".join(f"Row {i}; pack my box with five dozen liquor jugs!\n" for i in range(300))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    (out / "corpus.txt").write_text(LINES)
    args = ["pretrain", f"--out_dir={out}", f"--data.path={out / 'corpus.txt'}"]
    args += ["--train.max_steps=2", "--train.eval_every=2", "--train.save_every=2"]
    args += ["--train.batch_size=2", "--train.num_threads=1", "--sched.warmup_steps=0"]
    args += ["--model.n_layer=1", "--model.d_model=16", "--model.n_head=2"]
    args += ["--model.n_kv_head=2", "--model.context_length=16", "--data.vocab_size=300"]
    assert main([*args, "--sample.max_new_tokens=2"]) == 0
    return out


def test_eval_refuses_shards_of_another_tokenizer(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "other.txt").write_text(OTHER)
    other = tmp_path / "other"
    prep = ["data", "prepare", f"--data.path={tmp_path / 'other.txt'}", f"--out_dir={other}"]
    assert main([*prep, "--data.vocab_size=280"]) == 0
    capsys.readouterr()
    for data in (other, other / "val.bin"):
        assert main(["eval", f"--checkpoint={run_dir}", f"--data={data}"]) == 2
        err = capsys.readouterr().err
        assert "another tokenizer" in err and str(other) in err and "tokenizer" in err


def test_eval_accepts_the_same_tokenizer_written_differently(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(run_dir / "data", data)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    (data / "tokenizer.json").write_text(tok.to_str(pretty=False))  # other bytes, same tokenizer
    capsys.readouterr()
    assert main(["eval", f"--checkpoint={run_dir}", f"--data={data}"]) == 0
    assert json.loads(capsys.readouterr().out)["val_bpb"] > 0
