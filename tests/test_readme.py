"""The README's examples run as written: every ``lmforge ...`` command in its code blocks and
inline code is run through ``python -m lmforge`` (so the real argument parsing) with tiny
overrides appended (few steps, a tiny model, small data), and must exit 0.

Commands that cannot run here are listed in ``NOT_RUN`` with the reason; a test checks that the
two lists together cover the README, so a new example is either run or explained. The folders
the examples name (``runs/x``, ``prepared/``, ``corpus/``, ``path/config.json``, ...) are made
by the ``workdir`` fixture; each example runs in its own copy of it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CORPORA = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "data" / "corpora"

NOT_RUN = {
    "lmforge pretrain --nproc 2": "starts 2 processes (torchrun); the CLI side is "
    "tests/test_cli.py::test_nproc_starts_torchrun_for_every_training_command, training in "
    "tests/train/test_distributed.py",
    "lmforge pretrain --nproc 2 --dist.strategy=fsdp": "starts 2 processes (see above)",
    "lmforge pretrain --nproc 4 --dist.strategy=fsdp+tp --dist.tp_size=2": "starts 4 processes",
    "torchrun --standalone --nproc_per_node 8 -m lmforge pretrain --config gpt2_124m "
    "--dist.strategy=fsdp": "8 processes (one per GPU)",
    "torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint "
    "node0.example:29500 --rdzv_id my-run -m lmforge pretrain --config llama_350m "
    "--dist.strategy=fsdp --out_dir /shared/runs/llama350m": "several nodes",
    "lmforge generate --checkpoint hf_folder_or.gguf --prompt ...": "a placeholder for a "
    "Hugging Face folder or .gguf file: tests/interop/ load both",
    "lmforge finetune --config smollm2_gsm8k": "real SmolLM2-135M weights, ~19 min on this CPU",
    "lmforge merge": "named in prose; needs --base, --adapter and --out_dir "
    "(tests/recipes/test_finetune.py runs it)",
    "lmforge chat": "named in prose; needs --checkpoint and a conversation on stdin "
    "(tests/test_cli.py, tests/recipes/test_finetune.py run it)",
    "lmforge eval": "named in prose; needs --checkpoint and --data (the eval examples run)",
    "lmforge serve --checkpoint runs/x": "a server: runs until stopped; tests/serve/ start it on "
    "a free port (test_serve_command_binds_localhost_and_answers runs the command itself)",
    "lmforge serve --checkpoint runs/x --runs_dir runs": "a server (see above); "
    "tests/serve/test_web_browser.py drives its page in chromium",
    "lmforge dashboard --runs_dir runs": "a server: runs until stopped; "
    "tests/serve/test_web_runs.py runs the command on port 0",
    "lmforge tune --recipe pretrain --space space.yaml --n_trials 20 --out_dir tune-lr": "20 "
    "training runs; tests/tune/ run searches of 3-4 tiny trials (slow)",
    "lmforge classify-image": "the demo trains ~2 min here; tests/recipes/test_classify_image.py "
    "runs short digits runs",
    "lmforge explain --checkpoint runs/img --image digits:0 --out_dir cam": "needs an image "
    "classifier run; tests/diagnose/test_gradcam.py runs explain on one",
    "lmforge eval --checkpoint runs/img": "needs an image classifier run; tests/recipes/"
    "test_classify_image.py::test_eval_scores_the_runs_test_split_as_the_run_did runs it",
    "lmforge seq2seq": "the demo trains ~2-4 min here; tests/recipes/test_seq2seq.py runs micro "
    "runs by default and the demo itself (slow)",
}

# appended to the README's own arguments: a later value of the same key wins
TINY: dict[str, list[str]] = {
    "pretrain": [
        "--data.path=prepared",
        "--train.max_steps=3",
        "--train.eval_every=3",
        "--train.save_every=3",
        "--train.log_every=1",
        "--train.batch_size=2",
        "--train.num_threads=1",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        "--model.n_kv_head=2",
        "--model.context_length=32",
        # the CPU demo's QK-norm has no Hugging Face/GGUF form (the README's export row says
        # so); the hf and gguf export examples below need a plain Llama
        "--model.qk_norm=false",
        "--sample.max_new_tokens=4",
    ],
    "data prepare": ["--data.vocab_size=300"],
    "generate": ["--max_new_tokens=4"],
    "finetune": [
        "--demo_base.steps=4",
        "--demo_base.n_per_family=40",
        "--suite.n_per_family=12",
        "--train.max_steps=3",
        "--train.eval_every=3",
        "--train.batch_size=4",
        "--train.log_every=1",
        "--train.num_threads=1",
        "--n_eval=3",
        "--max_new_tokens=4",
    ],
    "classify": [
        "--init=null",
        "--tokenizer_vocab=300",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        "--train.batch_size=16",
        "--train.max_steps=4",
        "--train.eval_every=4",
        "--train.save_every=4",
        "--train.log_every=2",
        "--train.num_threads=1",
    ],
    "distill": [
        "--student.n_layer=1",
        "--student.d_model=16",
        "--student.n_head=2",
        "--student.n_kv_head=2",
        "--student.context_length=32",
        "--max_eval_bytes=2000",
        "--train.max_steps=2",
        "--train.eval_every=2",
        "--train.save_every=2",
        "--train.batch_size=2",
        "--train.num_threads=1",
        "--sched.warmup_steps=1",
    ],
    "compress": ["--max_eval_bytes=2000"],
    "mlm": [
        "--data.path=corpus/",
        "--data.vocab_size=300",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        "--model.context_length=32",
        "--eval_windows=4",
        "--train.max_steps=3",
        "--train.eval_every=3",
        "--train.save_every=3",
        "--train.log_every=1",
        "--train.batch_size=4",
        "--train.num_threads=1",
    ],
}
# a training run each: 20-70 s of this 2-core CPU per command (pretrain's fixed costs: imports,
# plots, tensorboard, the final sample), so `-m slow` runs them; the fixture's one pretrain of
# runs/x and the prepare/generate/eval/export/estimate examples run by default
SLOW = {"pretrain", "finetune", "classify", "mlm", "distill"}
NEEDS_CLASSIFIER = {"lmforge eval --checkpoint runs/cls --data test.csv"}

# Meta-Llama-3-8B's config.json (the README's `--model path/config.json`): read, never loaded
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def readme_commands() -> list[str]:
    """Every command the README shows, in order, once: lines of fenced code blocks that run
    lmforge (continuation lines joined, comments cut) and inline code starting ``lmforge ``;
    an optional ``[--flag]`` gives both forms."""
    text = README.read_text(encoding="utf-8")
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = " ".join(line.split(" #")[0].split())
            if line.startswith("lmforge ") or " -m lmforge " in line:
                found.append(line)
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith("lmforge "):
            optional = re.search(r"\s*\[(.+?)\]", span)
            if optional:
                bare = span.replace(optional.group(0), "")
                found += [bare, f"{bare} {optional.group(1)}"]
            else:
                found.append(span)
    return list(dict.fromkeys(found))


COMMANDS = readme_commands()
RUN = [c for c in COMMANDS if c not in NOT_RUN]


def subcommand(command: str) -> str:
    words = shlex.split(command)[1:]
    return " ".join(words[:2]) if words[:2] == ["data", "prepare"] else words[0]


def lmforge(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def check(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode == 0, f"{what}: exit {done.returncode}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folders the README's examples name: corpus/, prepared/ (from corpus/), runs/x (a
    tiny pretrain on prepared/), path/config.json, test.csv."""
    root = tmp_path_factory.mktemp("readme")
    (root / "corpus").mkdir()
    lines = (CORPORA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()[:3000]
    (root / "corpus" / "shakespeare.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare = ["data", "prepare", "--data.path=corpus/", "--out_dir=prepared"]
    check(lmforge([*prepare, *TINY["data prepare"]], root), "prepare prepared/")
    pretrain = ["pretrain", "--out_dir=runs/x", *TINY["pretrain"], "--train.max_steps=2"]
    check(lmforge([*pretrain, "--train.eval_every=2", "--train.save_every=2"], root), "runs/x")
    (root / "path").mkdir()
    (root / "path" / "config.json").write_text(json.dumps(LLAMA3_8B))
    shutil.copy(CORPORA / "support_tickets_test.csv", root / "test.csv")
    return root


def test_every_readme_command_is_run_or_explained() -> None:
    assert len(COMMANDS) >= 15, COMMANDS  # the extraction found the examples
    stale = sorted(set(NOT_RUN) - set(COMMANDS))
    assert not stale, f"NOT_RUN names commands the README no longer shows: {stale}"
    assert {subcommand(c) for c in RUN} >= {"pretrain", "generate", "eval", "export"}
    assert {subcommand(c) for c in RUN} >= {"data prepare", "estimate"}


def _params() -> list[object]:
    params = []
    for command in RUN:
        slow = subcommand(command) in SLOW or command in NEEDS_CLASSIFIER
        params.append(pytest.param(command, marks=[pytest.mark.slow] if slow else [], id=command))
    return params


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command: str, workdir: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "w"
    shutil.copytree(workdir, cwd, symlinks=True)
    if command in NEEDS_CLASSIFIER:  # runs/cls: the README's classify run
        check(lmforge(["classify", "--out_dir=runs/cls", *TINY["classify"]], cwd), "runs/cls")
    args = shlex.split(command)[1:]
    done = lmforge([*args, *TINY.get(subcommand(command), [])], cwd)
    check(done, command)
