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

import importlib
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
        return getattr(importlib.import_module(module), name)

    return get


def _configs_of(*paths: str) -> Callable[[], tuple[type[BaseModel], ...]]:
    """Lazy ``module:Class`` config types: the keys a raw command also accepts (the configs
    that ``estimate`` reads or ``tune`` tunes)."""
    return lambda: tuple(_config_of(*path.split(":"))() for path in paths)


@dataclass(frozen=True)
class _Recipe:
    """The runner of a command: import ``module`` (only now: torch costs a second), call its
    ``function`` with the resolved config and ``show`` what it returns — ``show`` is a printer,
    or the name of the recipe module's own printer. A recipe returns ``{}`` on ranks other than
    0, which print nothing. With ``exit_code`` the recipe's return value is the exit code."""

    module: str
    function: str
    show: Callable[[Any], None] | str | None = None
    exit_code: bool = False

    def __call__(self, cfg: Any) -> int:
        recipe = importlib.import_module(self.module)
        result = getattr(recipe, self.function)(cfg)
        if self.exit_code:
            return int(result)
        printer = getattr(recipe, self.show) if isinstance(self.show, str) else self.show
        if printer is not None and result:
            printer(result)
        return 0


def _json(keys: str = "") -> Callable[[dict[str, Any]], None]:
    """Print a recipe's summary as JSON: only ``keys`` (space-separated; those present) when
    given, in that order."""

    def show(summary: dict[str, Any]) -> None:
        kept = {k: summary[k] for k in keys.split() if k in summary} if keys else summary
        print(json.dumps(kept, indent=2))

    return show


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
        ),  # fmt: skip
        ("train / wall time", f"{s['train_seconds']:.0f} s / {s['wall_seconds']:.0f} s"),
        ("checkpoint", str(s["checkpoint"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(f"[bold]sample[/bold] (prompt {s['sample_prompt']!r}):")
    console.print(s["sample_prompt"] + s["sample"], markup=False, highlight=False)


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


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "train a decoder LM from raw text (no arguments: the CPU demo on the shipped corpus)",
        _config_of("lmforge.recipes.pretrain", "PretrainConfig"),
        _Recipe("lmforge.recipes.pretrain", "pretrain", show=_print_pretrain_summary),
        recipe="pretrain",
        preset="cpu_demo",
        nproc=True,
        resume_reads_run=True,
    ),
    "data prepare": Command(
        "clean, deduplicate and tokenize text into train/val shards",
        _config_of("lmforge.recipes.prepare", "PrepareConfig"),
        _Recipe(
            "lmforge.recipes.prepare",
            "prepare",
            show=_json(
                "dir vocab_size train_tokens val_tokens train_documents val_documents cleaning"
            ),
        ),
        recipe="prepare",
    ),
    "generate": Command(
        "sample text from a checkpoint, streaming to the terminal",
        _config_of("lmforge.recipes.generate", "GenerateConfig"),
        _Recipe("lmforge.recipes.generate", "generate"),  # it streams as it samples
        recipe="generate",
    ),
    "eval": Command(
        "perplexity and bits-per-byte of a checkpoint on a token folder, .bin file or text file",
        _config_of("lmforge.recipes.evaluate", "EvalConfig"),
        _Recipe("lmforge.recipes.evaluate", "evaluate", show=_json()),
        recipe="eval",
    ),
    "classify": Command(
        "fine-tune a BERT-style encoder for text classification (no arguments: MiniLM on the "
        "shipped support tickets)",
        _config_of("lmforge.recipes.classify", "ClassifyConfig"),
        _Recipe(
            "lmforge.recipes.classify",
            "classify",
            show=_json(
                "run_dir init steps stop_reason best_checkpoint eval_data eval_accuracy "
                "eval_f1_macro eval_roc_auc eval_ece wall_seconds report"
            ),
        ),
        recipe="classify",
        preset="support_tickets",
        nproc=True,
    ),
    "classify-image": Command(
        "train a Vision Transformer to classify images (no arguments: the 8x8 digits in sklearn)",
        _config_of("lmforge.recipes.classify_image", "ClassifyImageConfig"),
        _Recipe(
            "lmforge.recipes.classify_image",
            "classify_image",
            show=_json(
                "run_dir steps stop_reason best_checkpoint eval_accuracy eval_f1_macro "
                "eval_roc_auc eval_ece wall_seconds report"
            ),
        ),
        recipe="classify_image",
        resume_reads_run=True,
    ),
    "export": Command(
        "write a checkpoint for its runtime: --format hf|onnx|gguf, checked by that runtime",
        _config_of("lmforge.recipes.export", "ExportConfig"),
        _Recipe("lmforge.recipes.export", "export", show=print),
        recipe="export",
    ),
    "finetune": Command(
        "fine-tune a checkpoint on instructions: full, lora, dora, qlora or freeze, forgetting "
        "measured (no arguments: LoRA on the shipped instruction suite)",
        _config_of("lmforge.recipes.finetune", "FinetuneConfig"),
        _Recipe("lmforge.recipes.finetune", "finetune", show="print_summary"),
        recipe="finetune",
        nproc=True,
        resume_reads_run=True,
    ),
    "merge": Command(
        "fold a LoRA/DoRA adapter into its base and write a checkpoint folder",
        _config_of("lmforge.recipes.merge", "MergeConfig"),
        _Recipe("lmforge.recipes.merge", "merge", show=print),
        recipe="merge",
    ),
    "chat": Command(
        "chat turn by turn with a checkpoint, its chat template applied (reads stdin)",
        _config_of("lmforge.recipes.chat", "ChatConfig"),
        _Recipe("lmforge.recipes.chat", "chat"),
        recipe="chat",
    ),
    "estimate": Command(
        "predict peak memory (by component), time per step and which GPUs fit; --fit BUDGET plans",
        _config_of("lmforge.recipes.estimate", "EstimateConfig"),
        _estimate,
        recipe="estimate",
        raw=True,
        also_types=_configs_of(
            "lmforge.recipes.pretrain:PretrainConfig", "lmforge.recipes.finetune:FinetuneConfig"
        ),
    ),
    "tune": Command(
        "hyper-parameter search (Optuna) over any config keys of pretrain, finetune or classify; "
        "writes best_config.yaml and trials.csv",
        _config_of("lmforge.recipes.tune", "TuneConfig"),
        _tune,
        recipe="tune",
        raw=True,
        also_types=_configs_of(
            "lmforge.recipes.pretrain:PretrainConfig",
            "lmforge.recipes.finetune:FinetuneConfig",
            "lmforge.recipes.classify:ClassifyConfig",
        ),
    ),
    "doctor": Command(
        "diagnose a training run (overfitting, divergence, spikes, gradients, learning rate, "
        "data wait) with evidence and remedies; writes RUN_DIR/doctor.md",
        _config_of("lmforge.recipes.doctor", "DoctorConfig"),
        _Recipe("lmforge.recipes.doctor", "doctor"),  # it prints its findings
        recipe="doctor",
        positional="run_dir",
    ),
    "explain": Command(
        "attention maps, token attributions (integrated gradients) and the logit lens for one "
        "input; writes DIR/index.html",
        _config_of("lmforge.recipes.explain", "ExplainConfig"),
        _Recipe("lmforge.recipes.explain", "explain", show=lambda path: print(f"wrote {path}")),
        recipe="explain",
    ),
    "mlm": Command(
        "pretrain a BERT-style encoder by masked-token prediction (no arguments: the CPU demo "
        "on the shipped corpus)",
        _config_of("lmforge.recipes.mlm", "MlmConfig"),
        _Recipe("lmforge.recipes.mlm", "mlm", show=_json()),
        recipe="mlm",
        preset="cpu_demo",
        nproc=True,
    ),
    "serve": Command(
        "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching, streaming)",
        _config_of("lmforge.recipes.serve", "ServeConfig"),
        _Recipe("lmforge.recipes.serve", "serve"),
        recipe="serve",
    ),
    "dashboard": Command(
        "the run dashboard in a browser: loss / val / lr curves (live), config, summary, "
        "compare runs",
        _config_of("lmforge.recipes.dashboard", "DashboardConfig"),
        _Recipe("lmforge.recipes.dashboard", "dashboard", exit_code=True),
        recipe="dashboard",
    ),
    "seq2seq": Command(
        "fine-tune a T5/BART-style encoder-decoder on source->target pairs (no arguments: a "
        "generated date-rewriting task, scored before and after)",
        _config_of("lmforge.recipes.seq2seq", "Seq2SeqTaskConfig"),
        _Recipe("lmforge.recipes.seq2seq", "seq2seq", show="print_summary"),
        recipe="seq2seq",
    ),
    "compress quantize": Command(
        "quantize a checkpoint's linear layers (int8 dynamic, int8 or int4 weight-only, torchao); "
        "quality measured before and after",
        _config_of("lmforge.recipes.compress", "QuantizeConfig"),
        _Recipe("lmforge.recipes.compress", "quantize", show=_json()),
        recipe="quantize",
    ),
    "compress prune": Command(
        "prune a checkpoint: magnitude (unstructured) or heads and MLP channels (structured, "
        "smaller); quality before/after, a sparsity sweep plot, optional recovery fine-tune",
        _config_of("lmforge.recipes.compress", "PruneConfig"),
        _Recipe("lmforge.recipes.compress", "prune", show=_json()),
        recipe="prune",
    ),
    "distill": Command(
        "train a smaller student on a teacher's distributions (decoders: next tokens; "
        "classifiers: classes): KL at temperature T + cross-entropy",
        _config_of("lmforge.recipes.distill", "DistillConfig"),
        _Recipe("lmforge.recipes.distill", "distill", show=_json()),
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

    from lmforge.train.distributed import rank_tag, run_under_torchrun

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
            return run_under_torchrun(name, nproc, full, debug)
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


if __name__ == "__main__":
    sys.exit(main())
