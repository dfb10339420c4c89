"""`lmforge seq2seq`: a micro run on a JSONL task learns and writes a checkpoint that
``lmforge.load`` rebuilds (same predictions as the run scored) and ``lmforge export`` turns into
a folder ``transformers`` reloads with equal logits; fine-tuning starts from a Hugging Face BART
folder; bad data names its line; the no-argument demo (slow) learns its task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.data.seq2seq import pad_batch
from lmforge.models.seq2seq import Seq2Seq
from lmforge.recipes.seq2seq import score

WORDS = "red green blue cyan pink gold grey teal".split()

MICRO = ["--train.batch_size=16", "--train.max_steps=60", "--train.eval_every=30"]
MICRO += ["--train.save_every=30", "--train.log_every=10", "--train.num_threads=1"]
MICRO += ["--sched.warmup_steps=5", "--optim.lr=3e-3", "--eval_examples=16"]


def _write_task(path: Path, n: int, seed: int) -> Path:
    """Swap two words: learnable in a few dozen steps, not solvable by copying."""
    g = torch.Generator().manual_seed(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
            f.write(json.dumps({"source": f"{a} {b}", "target": f"{b} {a}"}) + "\n")
    return path


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_micro_run_learns_saves_loads_and_exports(tmp_path: Path, capsys) -> None:
    train = _write_task(tmp_path / "train.jsonl", 200, 0)
    val = _write_task(tmp_path / "val.jsonl", 16, 1)
    run = tmp_path / "run"
    args = ["seq2seq", f"--out_dir={run}", f"--train_file={train}", f"--val_file={val}"]
    args += ["--vocab_size=300", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64"]
    assert main(args + MICRO) == 0
    assert "val_exact_match" in capsys.readouterr().out  # the before/after table
    summary = json.loads((run / "summary.json").read_text())
    losses = [e["loss"] for e in _events(run) if "loss" in e and "val_chrf" not in e]
    assert losses[-1] < losses[0] / 2
    assert summary["after"]["val_chrf"] > summary["before"]["val_chrf"] + 20

    # the saved checkpoint is the model that was scored: same predictions on the same pairs
    model, tok, manifest = lmforge.load(run / "checkpoints" / "step-000060")
    assert isinstance(model, Seq2Seq) and manifest.kind == "encoder-decoder"
    pairs = [json.loads(x) for x in val.read_text().splitlines()]
    eos = model.cfg.eos_id
    examples = [
        (tok.encode(p["source"], add_special_tokens=False).ids + [eos], [eos]) for p in pairs
    ]
    metrics, predictions = score(model, tok, examples, [p["target"] for p in pairs], 64, 8, "cpu")
    assert predictions[:5] == [e["prediction"] for e in summary["examples"]]
    assert metrics["val_chrf"] == pytest.approx(summary["after"]["val_chrf"])

    # lmforge export → transformers reloads it with equal logits
    out = tmp_path / "hf"
    assert main(["export", f"--checkpoint={run}", f"--out_dir={out}"]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    x, y, kw = pad_batch(examples[:4], model.cfg.pad_id, model.cfg.decoder_start_id)
    with torch.no_grad():
        ref = hf(
            input_ids=x,
            attention_mask=kw["attention_mask"],
            decoder_input_ids=kw["decoder_input_ids"],
        ).logits
        got = model(x, kw["decoder_input_ids"], kw["attention_mask"])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_fine_tunes_from_a_hugging_face_bart_folder(tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = transformers.BartConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(cfg).save_pretrained(tmp_path / "bart")
    tok.save(str(tmp_path / "bart" / "tokenizer.json"))
    train = _write_task(tmp_path / "train.jsonl", 200, 0)
    run = tmp_path / "run"
    args = ["seq2seq", f"--out_dir={run}", f"--train_file={train}", f"--init={tmp_path / 'bart'}"]
    args += ["--max_source_tokens=16", "--max_target_tokens=16"]
    assert main(args + MICRO) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["style"] == "bart"
    assert summary["after"]["val_exact_match"] > summary["before"]["val_exact_match"]
    model, _tok, manifest = lmforge.load(run)
    assert manifest.family == "bart" and model.cfg.context_length == 32


def test_bad_pairs_name_the_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a", "tgt": "b"}\n')
    assert main(["seq2seq", f"--out_dir={tmp_path}/run", f"--train_file={bad}"]) == 1
    assert "bad.jsonl:2: key 'target' must be a string (missing)" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_with_no_arguments_learns_the_date_task(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["seq2seq"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["val_exact_match"] < 0.05
    assert summary["after"]["val_exact_match"] > 0.6


@pytest.mark.parametrize("objective", ["span_corruption", "text_infilling"])
def test_pretraining_objectives_learn_to_restore(objective: str, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(WORDS[int(i)] for i in torch.randint(8, (6,), generator=g)) for _ in range(300)
    ]
    texts.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = ["seq2seq", f"--out_dir={run}", f"--train_file={texts}", f"--objective={objective}"]
    args += ["--vocab_size=300", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64"]
    assert main(args + MICRO) == 0
    summary = json.loads((run / "summary.json").read_text())
    marker = "<extra_id_0>" if objective == "span_corruption" else "<mask>"
    assert all(marker in ex["source"] for ex in summary["examples"])
    if objective == "span_corruption":
        assert all(ex["target"].startswith("<extra_id_0>") for ex in summary["examples"])
    else:  # the target is the whole original text
        assert all(ex["target"] in lines for ex in summary["examples"])
    losses = [e["loss"] for e in _events(run) if "loss" in e and "val_chrf" not in e]
    assert losses[-1] < losses[0] * 0.8  # 60 steps: the copy is still being learnt
    assert summary["after"]["val_chrf"] > summary["before"]["val_chrf"]


def test_model_settings_with_init_are_refused(tmp_path: Path, capsys) -> None:
    args = ["seq2seq", f"--out_dir={tmp_path}/run", f"--init={tmp_path}", "--model.d_model=64"]
    assert main(args) == 2
    assert "brings its own architecture" in capsys.readouterr().err
