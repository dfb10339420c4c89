"""`lmforge mlm`: BERT's 80/10/10 masking rule on a large random batch, and a micro CLI run that
writes a checkpoint while the masked-token loss goes down."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.cli import main
from lmforge.recipes.mlm import mask_tokens


def test_masking_follows_the_80_10_10_rule() -> None:
    vocab, mask_id, specials = 1000, 2, [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (64, 512), generator=g)
    ids[:, ::50] = 1  # document separators: never masked
    inputs, labels = mask_tokens(ids, mask_id, specials, vocab, g, mask_prob=0.15)

    selected = labels != -100
    assert torch.equal(labels[selected], ids[selected])  # labels: the original ids, -100 elsewhere
    assert not selected[ids == 1].any()
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens untouched
    regular = (ids != 1).sum().item()
    assert abs(selected.sum().item() / regular - 0.15) < 0.005
    n = selected.sum().item()
    masked = (inputs[selected] == mask_id).sum().item()
    kept = (inputs[selected] == ids[selected]).sum().item()
    randomised = n - masked - kept
    assert abs(masked / n - 0.8) < 0.01
    # a random replacement may draw the original token (1 in 997): "kept" gets ~0.01 % extra
    assert abs(kept / n - 0.1) < 0.01 and abs(randomised / n - 0.1) < 0.01
    assert not torch.isin(inputs[selected & (inputs != mask_id)], torch.tensor([0, 1])).any()


def test_micro_mlm_run_writes_a_checkpoint_and_learns(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    )
    args = ["mlm", f"--out_dir={tmp_path}/run", f"--data.path={corpus}", "--data.vocab_size=300"]
    args += ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2"]
    args += ["--model.context_length=32", "--train.batch_size=16", "--train.max_steps=60"]
    args += ["--train.eval_every=30", "--train.save_every=30", "--train.log_every=10"]
    args += ["--train.num_threads=1", "--sched.warmup_steps=5", "--optim.lr=3e-3"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert printed["checkpoint"] == summary["checkpoint"]
    ckpt = Path(summary["checkpoint"])
    for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert summary["val_mlm_loss"] < summary["initial_val_mlm_loss"] - 1.0
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if "loss" in e and "val_mlm_loss" not in e]
    evals = [e["val_mlm_loss"] for e in events if "val_mlm_loss" in e]
    assert len(train) == 6 and train[-1] < train[0] and evals == sorted(evals, reverse=True)
