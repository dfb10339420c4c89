"""``lmforge finetune`` end to end on a tiny base (a few steps): summary, adapter and merged
model folders, forgetting with replay + EWC; ``lmforge merge`` reproduces the merged model;
``lmforge chat`` answers piped stdin turn by turn with the template applied."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from lmforge.cli import main
from lmforge.config import to_yaml
from lmforge.data.instructions import make_suite, write_jsonl
from lmforge.data.tokenizer import save_tokenizer, train_tokenizer
from lmforge.models.decoder import Decoder, DecoderConfig

pytest.importorskip("peft", reason="LoRA adapters come from peft (the finetune extra)")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random lmforge checkpoint folder (weights, config.yaml, tokenizer.json)."""
    out = tmp_path_factory.mktemp("base")
    text = "".join(f"{e['prompt']} = {e['answer']}\n" for e in make_suite(["reverse", "sort"], 50))
    tok = train_tokenizer([text + "<|im_start|>user assistant\n"], vocab_size=300)
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=tok.get_vocab_size(),
        context_length=96,
        n_layer=2,
        n_head=2,
        d_model=32,
    )
    save_model(Decoder(cfg), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(_Model(model=cfg)))
    save_tokenizer(tok, out / "tokenizer.json")
    return out


from lmforge.config import Section  # noqa: E402


class _Model(Section):
    model: DecoderConfig


FAST = [
    "--train.max_steps=3",
    "--train.eval_every=3",
    "--train.batch_size=4",
    "--train.log_every=1",
    "--sched.warmup_steps=1",
    "--n_eval=3",
    "--max_new_tokens=4",
    "--suite.n_per_family=12",
    "--train.num_threads=1",
]


def test_lora_finetune_merge_and_chat(base: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["finetune", f"--base={base}", f"--out_dir={run}", *FAST]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert (
        s["method"] == "lora" and s["steps"] == 3 and s["trainable_params"] < s["total_params"] / 3
    )
    assert 0 <= s["after"]["exact_match"] <= 1 and len(s["samples"]) == 3
    assert (run / "adapter" / "adapter_config.json").is_file()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("exact_match" in e for e in events)  # evaluated during training too
    # merge (adapter folder + base) == the merged model the run wrote
    out = tmp_path / "merged"
    assert (
        main(["merge", f"--base={base}", f"--adapter={run / 'adapter'}", f"--out_dir={out}"]) == 0
    )
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(run / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # chat on the run folder: one reply per piped line, history kept
    from lmforge.recipes.chat import ChatConfig, chat

    stdout = io.StringIO()
    n = chat(
        ChatConfig(checkpoint=str(run), max_new_tokens=5),
        io.StringIO("sort: 3 1\n/reset\nhi\n"),
        stdout,
    )
    assert n == 2 and len(stdout.getvalue().splitlines()) == 2


def test_bf16_mixed_lora_trains_a_bf16_base_and_merges_the_base_from_disk(
    base: Path, tmp_path: Path
) -> None:
    """bf16-mixed LoRA stores the frozen base in bf16 (EWC's Fisher and evaluation then run
    under autocast); the merged model is still the fp32 base from disk plus the adapter: bit for
    bit what ``lmforge merge`` writes."""
    retain = write_jsonl(make_suite(["lookup"], 10), tmp_path / "old.jsonl")
    run, out = tmp_path / "run", tmp_path / "merged"
    args = [f"--base={base}", f"--out_dir={run}", "--train.precision=bf16-mixed"]
    args += [f"--retain.path={retain}", "--retain.ewc_lambda=0.5", "--retain.fisher_batches=1"]
    assert main(["finetune", *args, "--retain.n_eval=2", *FAST]) == 0
    trained = load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))
    assert trained["blocks.0.attn.qkv.base_layer.weight"].dtype == torch.bfloat16
    assert trained["blocks.0.attn.qkv.lora_A.default.weight"].dtype == torch.float32
    assert trained["tok_emb.weight"].dtype == torch.float32
    assert (
        main(["merge", f"--base={base}", f"--adapter={run / 'adapter'}", f"--out_dir={out}"]) == 0
    )
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in b.values())
    base_w = load_file(str(base / "model.safetensors"))["blocks.0.attn.qkv.weight"]
    assert not torch.equal(b["blocks.0.attn.qkv.weight"], base_w)  # the adapter is in it


def test_full_finetune_with_retain_replay_and_ewc(base: Path, tmp_path: Path) -> None:
    retain = write_jsonl(make_suite(["lookup"], 10), tmp_path / "old.jsonl")
    run = tmp_path / "run"
    args = [
        "finetune",
        f"--base={base}",
        f"--out_dir={run}",
        "--method=full",
        f"--retain.path={retain}",
        "--retain.replay_rows=1",
        "--retain.ewc_lambda=0.5",
        "--retain.fisher_batches=1",
        "--retain.n_eval=2",
        *FAST,
    ]
    assert main(args) == 0
    s = json.loads((run / "summary.json").read_text())
    assert "forgetting_em" in s and "retain_em" in s["before"] and s["adapter"] is None
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("reg" in e for e in events)


def test_bad_data_names_file_and_line(base: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": 5}\n')
    assert (
        main(
            [
                "finetune",
                f"--base={base}",
                f"--data.path={bad}",
                f"--out_dir={tmp_path / 'r'}",
                *FAST,
            ]
        )
        == 1
    )
    assert f"{bad}:1: output: expected a string" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method,precision", [("lora", "fp32"), ("full", "fp32"), ("lora", "bf16-mixed")]
)
def test_resume_equals_uninterrupted(
    base: Path, tmp_path: Path, method: str, precision: str
) -> None:
    """A fine-tune resumed from its step-3 checkpoint ends with the same weights (adapters,
    optimizer state, data cursor, RNG) as the run that never stopped."""
    common = [f"--base={base}", f"--method={method}", "--lora.dropout=0.1", *FAST]
    common += [f"--train.precision={precision}"]
    common += ["--train.max_steps=6", "--train.save_every=3", "--train.eval_every=6"]
    whole = tmp_path / "whole"
    assert main(["finetune", f"--out_dir={whole}", *common]) == 0
    # the run as it was after step 3 (a resumed run continues in its own folder)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    step3 = resumed / "checkpoints" / "step-000003"
    assert main(["finetune", f"--out_dir={resumed}", f"--resume={step3}", *common]) == 0
    a = load_file(str(whole / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    s = json.loads((resumed / "summary.json").read_text())
    assert s["steps"] == 6


class _SignalAt:
    """A batch source that sends this process SIGINT as it hands out its ``at``-th batch
    (as a user's Ctrl-C mid-run would: fit finishes the step, saves, raises)."""

    def __init__(self, source, at: int) -> None:
        self.source, self.at, self.calls = source, at, 0
        self.context = source.context

    def next_batch(self):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)


def test_interrupted_finetune_resumes_with_the_printed_command(
    base: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Ctrl-C at step 3 prints ``Resume with: lmforge finetune --resume=<ckpt>``; that command,
    run as shown, continues the same run in its folder (no new demo base, no new run folder) and
    ends with the uninterrupted run's weights. (It used to start a fresh demo-base pretraining
    in a new runs/finetune-<date> folder.)"""
    import shlex

    import lmforge.recipes.finetune as recipe

    monkeypatch.chdir(tmp_path)  # a wrong default run folder would land here
    common = [f"--base={base}", "--lora.dropout=0.1", *FAST]
    common += ["--train.max_steps=6", "--train.save_every=100", "--train.eval_every=6"]
    assert main(["finetune", f"--out_dir={tmp_path / 'whole'}", *common]) == 0

    fit = recipe.fit
    monkeypatch.setattr(recipe, "fit", lambda m, o, b, *a, **k: fit(m, o, _SignalAt(b, 3), *a, **k))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["finetune", f"--out_dir={run}", *common]) == 130
    line = next(x for x in capsys.readouterr().err.splitlines() if "Resume with: " in x)
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command == ["lmforge", "finetune", f"--resume={run / 'checkpoints' / 'step-000003'}"]

    monkeypatch.setattr(recipe, "fit", fit)
    assert main(command[1:]) == 0
    assert not (tmp_path / "runs").exists()
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
