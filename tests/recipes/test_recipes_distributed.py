"""finetune, classify and mlm under the distributed seam (gloo, 2 CPU processes), as pretrain.

Each rank runs the real command (``lmforge.cli.main`` with torchrun's environment, from
``torch.multiprocessing.spawn``). The claims, as for pretrain (tests/train/test_distributed.py):
2 ranks x micro-batch b train exactly what 1 process does with micro-batch 2b (losses and
final weights equal to rtol 1e-4: only the summation order differs); rank 0's LoRA adapter
loads in peft; a distributed fine-tune resumed with the printed command (``--resume=<ckpt>``
alone) ends with the weights of the run that never stopped. All runs are fp32, dropout 0.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tests.tiny_checkpoint import write_tiny_decoder

from lmforge.cli import main
from lmforge.data.classification import default_paths
from lmforge.data.instructions import make_suite
from lmforge.train import distributed

pytest.importorskip("peft", reason="LoRA adapters come from peft (the finetune extra)")

RTOL, ATOL = 1e-4, 1e-5
# Weights after Adam steps: Adam divides each gradient by its own running scale, so a gradient
# near zero (an embedding row the batch barely touches) turns float-order noise between a gloo
# all-reduce and one process's sum into a visible relative difference (seen: 1.08e-5 on a
# position embedding worth 6.5e-4, 1 of 2,048 values, in one run of several). Losses keep 1e-5.
WEIGHT_ATOL = 5e-5
B = 2  # micro-batch per rank; the single process runs 2 * B


def make_base(out: Path) -> Path:
    """A tiny random lmforge decoder checkpoint (weights, config.yaml, tokenizer.json)."""
    text = "".join(f"{e['prompt']} = {e['answer']}\n" for e in make_suite(["reverse", "sort"], 50))
    return write_tiny_decoder(out, text + "<|im_start|>user assistant\n", 300, 96)


def finetune_args(base: Path, method: str, batch: int, steps: int = 3) -> list[str]:
    return [
        "finetune", f"--base={base}", f"--method={method}", "--lora.dropout=0",
        f"--train.batch_size={batch}", f"--train.max_steps={steps}", "--train.save_every=2",
        f"--train.eval_every={steps}", "--train.log_every=1", "--train.keep_last=5",
        "--sched.warmup_steps=1", "--n_eval=2", "--max_new_tokens=2", "--suite.n_per_family=12",
        "--train.num_threads=1",
    ]  # fmt: skip


def make_bert(out: Path, texts: list[str]) -> Path:
    """A tiny random Hugging Face BERT folder with a WordPiece tokenizer.json: the classifier's
    init. (A random-init classify run trains its own WordPiece, and tokenizers' WordPiece
    trainer breaks count ties differently in every process: two runs would not share a
    vocabulary. The 2-rank job shares rank 0's; this test needs the 1-process run to as well.)"""
    from transformers import BertConfig, BertModel

    from lmforge.data.classification import train_wordpiece

    tok = train_wordpiece(texts, 300)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=tok.token_to_id("[PAD]"),
    )  # fmt: skip
    BertModel(cfg).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    return out


def classify_args(train: Path, bert: Path, batch: int) -> list[str]:
    return [
        "classify", "--config=tiny_random", f"--init={bert}", f"--data.train={train}",
        f"--data.test={default_paths()['test']}", "--model.dropout=0", "--head.dropout=0",
        f"--train.batch_size={batch}", "--train.max_steps=4", "--train.eval_every=2",
        "--train.save_every=2", "--train.log_every=1", "--train.num_threads=1",
        "--sched.warmup_steps=1",
    ]  # fmt: skip


def mlm_args(corpus: Path, batch: int) -> list[str]:
    return [
        "mlm", f"--data.path={corpus}", "--data.vocab_size=300", "--model.n_layer=1",
        "--model.d_model=32", "--model.n_head=2", "--model.context_length=32",
        "--model.dropout=0", f"--train.batch_size={batch}", "--train.max_steps=4",
        "--train.eval_every=2", "--train.save_every=2", "--train.log_every=1",
        "--train.num_threads=1", "--sched.warmup_steps=1", "--eval_windows=8",
    ]  # fmt: skip


def _ranks(rank: int, world: int, ports: list[int], commands: list[list[str]]) -> None:
    # one port per command, as each would be its own torchrun job: a rank that finishes first
    # must not reach the previous job's rendezvous store, still up on rank 0
    for port, args in zip(ports, commands, strict=True):
        distributed.set_local_rank_env(rank, world, port)
        code = main([*args, "--dist.timeout_s=180"])
        assert code == 0, f"rank {rank}: {args[0]} exited {code}"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def on_two_ranks(commands: list[list[str]]) -> None:
    mp.spawn(_ranks, args=(2, free_ports(len(commands)), commands), nprocs=2, join=True)


def losses(run: Path) -> list[float]:
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if "loss" in e]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_same_run(two: Path, one: Path, step: int, rtol=RTOL, atol=ATOL) -> None:
    a, b = losses(two), losses(one)
    assert len(a) == len(b) == step
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=rtol, atol=atol)
    wa, wb = weights(two, step), weights(one, step)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(
            wa[k], wb[k], rtol=rtol, atol=max(atol, WEIGHT_ATOL), msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank start for every recipe (ddp: dist.strategy auto); the 1-process runs too."""
    root = tmp_path_factory.mktemp("ddp")
    base = make_base(root / "base")
    rows = default_paths()["train"].read_text().splitlines()
    (root / "train.csv").write_text("\n".join(rows[:121]) + "\n")
    bert = make_bert(root / "bert", rows[1:121])
    (root / "corpus.txt").write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    )
    jobs = {
        "lora": lambda n, b: finetune_args(base, "lora", b, steps=4),
        "full": lambda n, b: finetune_args(base, "full", b),
        "classify": lambda n, b: classify_args(root / "train.csv", bert, b),
        "mlm": lambda n, b: mlm_args(root / "corpus.txt", b),
    }
    on_two_ranks([[*job(2, B), f"--out_dir={root / name / '2'}"] for name, job in jobs.items()])
    for name, job in jobs.items():
        assert main([*job(1, 2 * B), f"--out_dir={root / name / '1'}"]) == 0
    return root


def test_finetune_lora_ddp_equals_one_process_with_double_batch(ddp: Path) -> None:
    assert_same_run(ddp / "lora" / "2", ddp / "lora" / "1", 4)
    s2 = json.loads((ddp / "lora" / "2" / "summary.json").read_text())
    s1 = json.loads((ddp / "lora" / "1" / "summary.json").read_text())
    assert s2["steps"] == 4 and s2["after"] == s1["after"]  # rank 0 scored the same weights


def test_finetune_full_ddp_equals_one_process_with_double_batch(ddp: Path) -> None:
    assert_same_run(ddp / "full" / "2", ddp / "full" / "1", 3)
    merged = load_file(str(ddp / "full" / "2" / "model" / "model.safetensors"))
    for k, v in weights(ddp / "full" / "2", 3).items():  # rank 0 wrote the trained model
        torch.testing.assert_close(merged[k], v, rtol=0, atol=0)


def test_classify_ddp_equals_one_process_with_double_batch(ddp: Path) -> None:
    assert_same_run(ddp / "classify" / "2", ddp / "classify" / "1", 4)
    report = json.loads((ddp / "classify" / "2" / "eval" / "report.json").read_text())
    assert report["metrics"]["n"] == 400  # rank 0 wrote the test report


def test_mlm_ddp_equals_one_process_with_double_batch(ddp: Path) -> None:
    assert_same_run(ddp / "mlm" / "2", ddp / "mlm" / "1", 4)


def test_rank0_lora_adapter_loads_in_peft(ddp: Path, tmp_path: Path) -> None:
    """The adapter rank 0 saved, put on the exported HF base by peft, gives the logits of the
    merged model the run wrote."""
    import peft
    import transformers

    from lmforge.checkpoint.load import load
    from lmforge.interop.hf import export_hf

    run = ddp / "lora" / "2"
    base, _, _ = load(ddp / "base", torch.device("cpu"), expect="decoder")
    export_hf(base, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = peft.PeftModel.from_pretrained(hf, run / "adapter").eval()
    merged, _, _ = load(run / "model", torch.device("cpu"), expect="decoder")
    x = torch.arange(24).reshape(2, 12) % 200
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, merged(x), rtol=0, atol=1e-5)


@pytest.mark.slow  # a second 2-process start: ~75 s on this shared 2-core machine
def test_distributed_finetune_resumes_with_the_printed_command(ddp: Path) -> None:
    """2 ranks resumed from step 2 with ``--resume=<checkpoint>`` alone (the command printed on
    an interrupt) end with the uninterrupted 2-rank run's weights, in the same folder."""
    run = ddp / "lora" / "resumed"
    shutil.copytree(ddp / "lora" / "2", run)
    for leftover in ("summary.json", "adapter", "model"):
        shutil.rmtree(run / leftover) if (run / leftover).is_dir() else (run / leftover).unlink()
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    # the copied config names the original folder: point it at the copy, as if it were the run
    cfg = (run / "config.yaml").read_text().replace(str(ddp / "lora" / "2"), str(run))
    (run / "config.yaml").write_text(cfg)
    on_two_ranks([["finetune", f"--resume={run / 'checkpoints' / 'step-000002'}"]])
    a, b = weights(run, 4), weights(ddp / "lora" / "2", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(ddp / "lora" / "2")
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow  # another 2-process start, and FSDP's gathers on 2 shared cores
def test_finetune_full_fsdp_equals_one_process_with_double_batch(ddp: Path) -> None:
    out = ddp / "full" / "fsdp"
    args = finetune_args(ddp / "base", "full", B)
    on_two_ranks([[*args, "--dist.strategy=fsdp", f"--out_dir={out}"]])
    assert_same_run(out, ddp / "full" / "1", 3)
    merged = load_file(str(out / "model" / "model.safetensors"))  # gathered on rank 0
    for k, v in weights(ddp / "full" / "1", 3).items():
        torch.testing.assert_close(merged[k], v, rtol=RTOL, atol=ATOL)


def test_qlora_and_sharded_lora_are_refused_clearly() -> None:
    """Under several processes on the CPU: qlora (NF4 weights cannot go over gloo), lora under
    fsdp (only full and freeze are sharded); a ConfigError (exit 2) saying what to do."""
    from lmforge.errors import ConfigError
    from lmforge.recipes.finetune import FinetuneConfig, _check_layout

    ddp = distributed.Parallel("ddp", 0, 2, 0, 2, 1, torch.device("cpu"))
    fsdp = distributed.Parallel("fsdp", 0, 2, 0, 2, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="method=qlora runs in one process on the CPU"):
        _check_layout(FinetuneConfig(method="qlora", base="x"), ddp)
    with pytest.raises(ConfigError, match="finetune method=lora runs under ddp only"):
        _check_layout(FinetuneConfig(method="lora", base="x"), fsdp)
    _check_layout(FinetuneConfig(method="full", base="x"), fsdp)
    _check_layout(FinetuneConfig(method="lora", base="x"), ddp)
