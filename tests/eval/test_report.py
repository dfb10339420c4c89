"""Report folders: classification report (json, markdown, plots, worst examples) and the
generation path of `lmforge eval` (prompt/reference .jsonl → BLEU/ROUGE/EM + length plot)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from lmforge.cli import main
from lmforge.eval.metrics import classification_metrics
from lmforge.eval.report import classification_report


def test_classification_report_files_and_worst_examples(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    labels = ["a", "b", "c"]
    m = classification_metrics(y, probs, labels)
    classification_report(tmp_path, m, y, probs, labels, ["t0", "t1", "t2", "t3"], n_worst=2)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [w["index"] for w in rep["worst_examples"]] == [1, 3]  # lowest p(true class) first
    assert rep["worst_examples"][0]["predicted"] == "a"
    md = (tmp_path / "report.md").read_text()
    assert "| accuracy | 0.7500 |" in md and "![roc](plots/roc.png)" in md
    for name in ("confusion", "roc", "pr", "calibration"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_eval_generation_path(tmp_path: Path, capsys) -> None:
    from lmforge.checkpoint.store import save_checkpoint
    from lmforge.data.tokenizer import save_tokenizer, train_tokenizer
    from lmforge.models.decoder import Decoder, DecoderConfig

    tok = train_tokenizer(["the cat sat on the mat. " * 20], vocab_size=300)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    cfg = DecoderConfig(
        vocab_size=tok.get_vocab_size(), context_length=64, n_layer=1, n_head=2, d_model=32
    )
    torch.manual_seed(0)
    files = {
        "config.yaml": yaml.safe_dump({"model": cfg.model_dump()}),
        "tokenizer.json": tmp_path / "tokenizer.json",
    }
    save_checkpoint(tmp_path / "run", 1, Decoder(cfg), None, files)
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "the cat", "reference": "sat on the mat"},
        {"prompt": "on the", "reference": "mat"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert (
        main(["eval", f"--checkpoint={tmp_path / 'run'}", f"--data={prompts}", f"--out_dir={out}"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert {
        "bleu",
        "chrf",
        "rouge1",
        "rouge2",
        "rougeL",
        "exact_match",
        "token_f1",
    } <= printed.keys()
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["worst_examples"]) == 2 and (out / "plots" / "length_vs_score.png").is_file()
