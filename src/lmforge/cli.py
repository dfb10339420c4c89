"""The ``lmforge`` command: an explicit table from subcommand to recipe function.

Every command takes ``--config FILE.yaml`` (or a shipped preset name), dotted overrides
(``--optim.lr=1e-3``), ``--debug`` and ``--help``; the help text is generated from the typed
config, so it cannot drift from what the command accepts. Every command's config is built by
one function, ``resolve_config``: the command's defaults (its shipped preset, if it names one)
← ``--config`` ← overrides typed by the field they set. Exit codes: 0 success, 2 bad usage or
config, 1 runtime failure, 130 interrupted (after writing a checkpoint) — an error's own
``exit_code`` (``errors.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmforge import __version__
from lmforge.config import config_help, load_config, parse_overrides
from lmforge.errors import ConfigError, LmforgeError, TrainingInterrupted


@dataclass(frozen=True)
class Command:
    """One subcommand. ``config`` is lazy (importing torch costs a second); ``run`` gets the
    resolved config and returns the exit code."""

    help: str
    config: Callable[[], type[BaseModel]]
    run: Callable[[Any], int]
    recipe: str  # folder of its shipped presets: configs/<recipe>/
    preset: str | None = None  # the shipped preset that runs with no --config
    nproc: bool = False  # a training command: --nproc N starts torchrun
    resume_reads_run: bool = False  # --resume without --config starts from the run's config.yaml
    # estimate composes its own options with a pretrain or fine-tune config, which it resolves
    # itself (with the same load_config); its run gets (config file, typed overrides)
    raw: bool = False
    also_types: Callable[[], tuple[type[BaseModel], ...]] = tuple
    positional: str | None = None  # the field a leading bare argument fills (`doctor RUN_DIR`)


def _config_of(module: str, name: str) -> Callable[[], type[BaseModel]]:
    def get() -> type[BaseModel]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return get


def _pretrain(cfg: Any) -> int:
    from lmforge.recipes.pretrain import pretrain

    summary = pretrain(cfg)
    if summary:  # {} on ranks other than 0
        _print_pretrain_summary(summary)
    return 0


def _prepare(cfg: Any) -> int:
    from lmforge.recipes.prepare import prepare

    meta = prepare(cfg)
    keys = (
        "dir",
        "vocab_size",
        "train_tokens",
        "val_tokens",
        "train_documents",
        "val_documents",
        "cleaning",
    )
    print(json.dumps({k: meta[k] for k in keys if k in meta}, indent=2))
    return 0


def _generate(cfg: Any) -> int:
    from lmforge.recipes.generate import generate

    generate(cfg)
    return 0


def _eval(cfg: Any) -> int:
    from lmforge.recipes.evaluate import evaluate

    print(json.dumps(evaluate(cfg), indent=2))
    return 0


def _export(cfg: Any) -> int:
    from lmforge.recipes.export import export

    print(export(cfg))
    return 0


def _seq2seq(cfg: Any) -> int:
    from lmforge.recipes.seq2seq import print_summary, seq2seq

    print_summary(seq2seq(cfg))
    return 0


def _classify(cfg: Any) -> int:
    from lmforge.recipes.classify import classify

    summary = classify(cfg)
    keep = ("run_dir", "init", "steps", "stop_reason", "best_checkpoint", "eval_data")
    keep += ("eval_accuracy", "eval_f1_macro", "eval_roc_auc", "eval_ece", "wall_seconds", "report")
    if summary:  # {} on ranks other than 0
        print(json.dumps({k: summary[k] for k in keep if k in summary}, indent=2))
    return 0


def _classify_image(cfg: Any) -> int:
    from lmforge.recipes.classify_image import classify_image

    summary = classify_image(cfg)
    keep = ("run_dir", "steps", "stop_reason", "best_checkpoint", "eval_accuracy", "eval_f1_macro")
    print(json.dumps({k: summary[k] for k in keep + ("eval_roc_auc", "eval_ece", "wall_seconds",
                                                     "report") if k in summary}, indent=2))  # fmt: skip
    return 0


def _finetune(cfg: Any) -> int:
    from lmforge.recipes.finetune import finetune, print_summary

    summary = finetune(cfg)
    if summary:  # {} on ranks other than 0
        print_summary(summary)
    return 0


def _merge(cfg: Any) -> int:
    from lmforge.recipes.merge import merge

    print(merge(cfg))
    return 0


def _doctor(cfg: Any) -> int:
    from lmforge.recipes.doctor import doctor

    doctor(cfg)
    return 0


def _explain(cfg: Any) -> int:
    from lmforge.recipes.explain import explain

    print(f"wrote {explain(cfg)}")
    return 0


def _chat(cfg: Any) -> int:
    from lmforge.recipes.chat import chat

    chat(cfg)
    return 0


def _mlm(cfg: Any) -> int:
    from lmforge.recipes.mlm import mlm

    summary = mlm(cfg)
    if summary:  # {} on ranks other than 0
        print(json.dumps(summary, indent=2))
    return 0


def _dashboard(cfg: Any) -> int:
    from lmforge.recipes.dashboard import dashboard

    return dashboard(cfg)


def _serve(cfg: Any) -> int:
    from lmforge.recipes.serve import serve

    serve(cfg)
    return 0


def _compress(name: str) -> Callable[[Any], int]:
    def run(cfg: Any) -> int:
        import lmforge.recipes.compress as recipe

        print(json.dumps(getattr(recipe, name)(cfg), indent=2))
        return 0

    return run


def _distill(cfg: Any) -> int:
    from lmforge.recipes.distill import distill

    print(json.dumps(distill(cfg), indent=2))
    return 0


def _estimate(raw: tuple[str | None, dict[str, Any]]) -> int:
    from lmforge.recipes.estimate import print_report, run

    config_file, overrides = raw
    report = run(config_file, overrides)
    print_report(report, as_json=bool(overrides.get("json")))
    return 0


def _tune(raw: tuple[str | None, dict[str, Any]]) -> int:
    from lmforge.recipes.tune import split_options, tune

    config_file, overrides = raw
    cfg, rest = split_options(overrides)
    s = tune(cfg, config_file, rest)
    print(f"best: trial {s['best_trial']} {s['best_params']} → {cfg.metric} {s['best_value']:.6g} "
          f"({s['complete']} complete of {s['trials']} trials)\n"
          f"run it: lmforge {cfg.recipe} --config {s['out_dir']}/best_config.yaml")  # fmt: skip
    return 0


def _tune_types() -> tuple[type[BaseModel], ...]:
    """tune's options, then the keys of the configs it tunes."""
    from lmforge.recipes.classify import ClassifyConfig
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.recipes.pretrain import PretrainConfig

    return PretrainConfig, FinetuneConfig, ClassifyConfig


def _estimate_types() -> tuple[type[BaseModel], ...]:
    """estimate's options, then the keys of the pretrain or fine-tune config it reads."""
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.recipes.pretrain import PretrainConfig

    return PretrainConfig, FinetuneConfig


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "train a decoder LM from raw text (no arguments: the CPU demo on the shipped corpus)",
        _config_of("lmforge.recipes.pretrain", "PretrainConfig"),
        _pretrain,
        recipe="pretrain",
        preset="cpu_demo",
        nproc=True,
        resume_reads_run=True,
    ),
    "data prepare": Command(
        "clean, deduplicate and tokenize text into train/val shards",
        _config_of("lmforge.recipes.prepare", "PrepareConfig"),
        _prepare,
        recipe="prepare",
    ),
    "generate": Command(
        "sample text from a checkpoint, streaming to the terminal",
        _config_of("lmforge.recipes.generate", "GenerateConfig"),
        _generate,
        recipe="generate",
    ),
    "eval": Command(
        "perplexity and bits-per-byte of a checkpoint on a token folder, .bin file or text file",
        _config_of("lmforge.recipes.evaluate", "EvalConfig"),
        _eval,
        recipe="eval",
    ),
    "classify": Command(
        "fine-tune a BERT-style encoder for text classification (no arguments: MiniLM on the "
        "shipped support tickets)",
        _config_of("lmforge.recipes.classify", "ClassifyConfig"),
        _classify,
        recipe="classify",
        preset="support_tickets",
        nproc=True,
    ),
    "classify-image": Command(
        "train a Vision Transformer to classify images (no arguments: the 8x8 digits in sklearn)",
        _config_of("lmforge.recipes.classify_image", "ClassifyImageConfig"),
        _classify_image,
        recipe="classify_image",
        resume_reads_run=True,
    ),
    "export": Command(
        "write a checkpoint for its runtime: --format hf|onnx|gguf, checked by that runtime",
        _config_of("lmforge.recipes.export", "ExportConfig"),
        _export,
        recipe="export",
    ),
    "finetune": Command(
        "fine-tune a checkpoint on instructions: full, lora, dora, qlora or freeze, forgetting "
        "measured (no arguments: LoRA on the shipped instruction suite)",
        _config_of("lmforge.recipes.finetune", "FinetuneConfig"),
        _finetune,
        recipe="finetune",
        nproc=True,
        resume_reads_run=True,
    ),
    "merge": Command(
        "fold a LoRA/DoRA adapter into its base and write a checkpoint folder",
        _config_of("lmforge.recipes.merge", "MergeConfig"),
        _merge,
        recipe="merge",
    ),
    "chat": Command(
        "chat turn by turn with a checkpoint, its chat template applied (reads stdin)",
        _config_of("lmforge.recipes.chat", "ChatConfig"),
        _chat,
        recipe="chat",
    ),
    "estimate": Command(
        "predict peak memory (by component), time per step and which GPUs fit; --fit BUDGET plans",
        _config_of("lmforge.recipes.estimate", "EstimateConfig"),
        _estimate,
        recipe="estimate",
        raw=True,
        also_types=_estimate_types,
    ),
    "tune": Command(
        "hyper-parameter search (Optuna) over any config keys of pretrain, finetune or classify; "
        "writes best_config.yaml and trials.csv",
        _config_of("lmforge.recipes.tune", "TuneConfig"),
        _tune,
        recipe="tune",
        raw=True,
        also_types=_tune_types,
    ),
    "doctor": Command(
        "diagnose a training run (overfitting, divergence, spikes, gradients, learning rate, "
        "data wait) with evidence and remedies; writes RUN_DIR/doctor.md",
        _config_of("lmforge.recipes.doctor", "DoctorConfig"),
        _doctor,
        recipe="doctor",
        positional="run_dir",
    ),
    "explain": Command(
        "attention maps, token attributions (integrated gradients) and the logit lens for one "
        "input; writes DIR/index.html",
        _config_of("lmforge.recipes.explain", "ExplainConfig"),
        _explain,
        recipe="explain",
    ),
    "mlm": Command(
        "pretrain a BERT-style encoder by masked-token prediction (no arguments: the CPU demo "
        "on the shipped corpus)",
        _config_of("lmforge.recipes.mlm", "MlmConfig"),
        _mlm,
        recipe="mlm",
        preset="cpu_demo",
        nproc=True,
    ),
    "serve": Command(
        "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching, streaming)",
        _config_of("lmforge.recipes.serve", "ServeConfig"),
        _serve,
        recipe="serve",
    ),
    "dashboard": Command(
        "the run dashboard in a browser: loss / val / lr curves (live), config, summary, "
        "compare runs",
        _config_of("lmforge.recipes.dashboard", "DashboardConfig"),
        _dashboard,
        recipe="dashboard",
    ),
    "seq2seq": Command(
        "fine-tune a T5/BART-style encoder-decoder on source->target pairs (no arguments: a "
        "generated date-rewriting task, scored before and after)",
        _config_of("lmforge.recipes.seq2seq", "Seq2SeqTaskConfig"),
        _seq2seq,
        recipe="seq2seq",
    ),
    "compress quantize": Command(
        "quantize a checkpoint's linear layers (int8 dynamic, int8 or int4 weight-only, torchao); "
        "quality measured before and after",
        _config_of("lmforge.recipes.compress", "QuantizeConfig"),
        _compress("quantize"),
        recipe="quantize",
    ),
    "compress prune": Command(
        "prune a checkpoint: magnitude (unstructured) or heads and MLP channels (structured, "
        "smaller); quality before/after, a sparsity sweep plot, optional recovery fine-tune",
        _config_of("lmforge.recipes.compress", "PruneConfig"),
        _compress("prune"),
        recipe="prune",
    ),
    "distill": Command(
        "train a smaller student on a teacher's distributions (decoders: next tokens; "
        "classifiers: classes): KL at temperature T + cross-entropy",
        _config_of("lmforge.recipes.distill", "DistillConfig"),
        _distill,
        recipe="distill",
    ),
}


def resolve_config(name: str, config_file: str | None, overrides: dict[str, Any]) -> BaseModel:
    """The config ``lmforge <name>`` runs: the command's defaults (its shipped preset when it
    names one; for ``--resume`` without ``--config`` on a command that reads its run, the run's
    own ``config.yaml``) ← ``config_file`` ← ``overrides``."""
    command = COMMANDS[name]
    if command.resume_reads_run and not config_file and overrides.get("resume"):
        from lmforge.runs import saved_config

        saved = saved_config(overrides["resume"], overrides.get("out_dir"))
        if saved is not None:  # the run continues in its own folder, wherever it now is
            config_file, overrides = str(saved), {"out_dir": None, **overrides}
    return load_config(
        command.config(),
        config_file=config_file or command.preset,
        overrides=overrides,
        recipe=command.recipe,
    )


def torchrun_command(name: str, nproc: int, args: list[str], debug: bool = False) -> list[str]:
    """``lmforge <name> --nproc N ARGS`` → the torchrun command line that runs ``lmforge <name>
    ARGS`` in N processes on this machine. Without ``--debug`` torchrun runs inside a small
    wrapper that reports a failed rank in one line instead of torchrun's traceback (the rank
    has already printed its own message)."""
    launcher = ["-m", "torch.distributed.run"] if debug else ["-c", _TORCHRUN_QUIET]
    return [
        sys.executable,
        *launcher,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmforge",
        *name.split(),
        *args,
        *(["--debug"] if debug else []),
    ]


_TORCHRUN_QUIET = """\
import logging, signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
logging.disable(logging.ERROR)  # torchrun's own log lines; the ranks print their messages
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    code = failure.exitcode
    if code < 0:
        print(f"rank {rank} was stopped by signal {signal.Signals(-code).name}", file=sys.stderr)
    sys.exit(code if code > 0 else 1)
except SignalException as e:  # Ctrl-C / SIGTERM: torchrun has stopped the ranks
    sys.exit(128 + int(e.sigval))
"""


def _run_under_torchrun(name: str, nproc: int, args: list[str], debug: bool) -> int:
    """Start ``torchrun --standalone --nproc_per_node N -m lmforge <name> ...``; torchrun stops
    every rank when one fails and exits non-zero."""
    import subprocess

    cmd = torchrun_command(name, nproc, args, debug)
    shown = " ".join(["torchrun", *cmd[3:]])  # after the interpreter and the launcher
    print(f"lmforge {name}: starting {nproc} processes: {shown}", file=sys.stderr)
    code = subprocess.call(cmd)
    if code not in (0, 2, 130):
        print(
            f"lmforge {name}: the {nproc}-process job failed (exit code {code}); the messages "
            "above name the failing rank. Resume from the last checkpoint with the same command "
            "plus --resume.",
            file=sys.stderr,
        )
    return code if code in (0, 2, 130) else 1


def usage() -> str:
    rows = "\n".join(f"  {name:<14} {cmd.help}" for name, cmd in COMMANDS.items())
    return (
        f"lmforge {__version__} — train transformer language models\n\n"
        "usage: lmforge <command> [--config FILE.yaml] [--section.key=value ...] [--debug]\n\n"
        f"commands:\n{rows}\n\n`lmforge <command> --help` lists every option."
    )


def _help(name: str, command: Command) -> str:
    model = command.config()
    try:  # what runs with no --config; a command with required options has no such config
        defaults: BaseModel | None = None if command.raw else resolve_config(name, None, {})
    except ConfigError:
        defaults = None
    lines = [f"lmforge {name}: {command.help}\n\noptions (also settable in --config FILE.yaml):"]
    if command.preset:
        lines.append(f"    (defaults shown are the shipped preset {command.preset!r}, what runs "
                     "with no --config)")  # fmt: skip
    lines.append("    --config=FILE  a YAML file or shipped preset name (once)")
    lines.append("    --debug  show tracebacks")
    if command.nproc:
        lines.append("    --nproc=N  run N processes on this machine (torchrun; see dist.strategy)")
    lines += config_help(model, defaults=defaults)
    return "\n".join(lines)


def _pop_option(args: list[str], option: str) -> tuple[str | None, list[str]]:
    """``--option VALUE`` / ``--option=VALUE`` out of ``args`` (given at most once)."""
    found: list[tuple[int, int, str]] = []  # (position, arguments used, value)
    for i, a in enumerate(args):
        if a == option:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{option} needs a value: {option}=VALUE")
            found.append((i, 2, args[i + 1]))
        elif a.startswith(option + "="):
            found.append((i, 1, a.split("=", 1)[1]))
    if not found:
        return None, args
    if len(found) > 1:
        given = ", ".join(repr(v) for _, _, v in found)
        raise ConfigError(
            f"{option} is given {len(found)} times ({given}); give it once (put the other "
            "settings in that file or on the command line as --section.key=value)"
        )
    i, used, value = found[0]
    return value, args[:i] + args[i + used :]


def _parse_nproc(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"--nproc needs a positive number of processes, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # `lmforge pretrain --help | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    command = COMMANDS.get(name)
    if command is None:
        print(f"lmforge: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
        return 2
    args = argv[len(name.split()) :]
    if command.positional and args and not args[0].startswith("-"):
        args = [f"--{command.positional}", args[0], *args[1:]]
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if "-h" in args or "--help" in args:
        print(_help(name, command))
        return 0

    from lmforge.train.distributed import rank_tag

    shown = name + rank_tag()  # error messages name the rank in a multi-process job
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if main_rank else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    try:
        config_file, args = _pop_option(args, "--config")
        nproc = None
        if command.nproc:
            value, args = _pop_option(args, "--nproc")
            nproc = _parse_nproc(value) if value is not None else None
        types = (command.config(), *command.also_types())
        overrides = parse_overrides(args, *types)
        if command.raw:
            return command.run((config_file, overrides))
        cfg = resolve_config(name, config_file, overrides)  # a bad config fails once, here
        if nproc is not None and nproc > 1 and "RANK" not in os.environ:
            full = (["--config", config_file] if config_file else []) + args
            return _run_under_torchrun(name, nproc, full, debug)
        return command.run(cfg)
    except TrainingInterrupted as e:
        print(
            f"lmforge {name}: {e}. Resume with: lmforge {name} --resume={e.checkpoint}",
            file=sys.stderr,
        )
        return e.exit_code
    except LmforgeError as e:  # the message says what, where and what to do
        if debug and not isinstance(e, ConfigError):
            raise
        print(f"lmforge {shown}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmforge {shown}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one paragraph for users; the traceback with --debug
        if debug:
            raise
        print(
            f"lmforge {shown}: {type(e).__name__}: {e}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _print_pretrain_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="pretrain summary", show_header=False)
    rows = [
        ("run folder", s["run_dir"]),
        ("steps", f"{s['steps']} ({s['stop_reason']})"),
        ("val loss (nats/token)", f"{s.get('val_loss', float('nan')):.4f}"),
        ("val perplexity", f"{s.get('val_ppl', float('nan')):.2f}"),
        ("val bits-per-byte", f"{s.get('val_bpb', float('nan')):.4f}"),
        ("parameters", f"{s['parameters'] / 1e6:.2f}M"),
        ("tokens/s", f"{s['tokens_per_s']:,.0f}"),
        (
            "MFU",
            f"{s['mfu']:.1%} of {s['peak_flops'] / 1e9:.0f} GFLOP/s ({s['peak_flops_source']})"
            if s["mfu"]
            else "n/a",
        ),
        ("train / wall time", f"{s['train_seconds']:.0f} s / {s['wall_seconds']:.0f} s"),
        ("checkpoint", str(s["checkpoint"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(f"[bold]sample[/bold] (prompt {s['sample_prompt']!r}):")
    console.print(s["sample_prompt"] + s["sample"], markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
