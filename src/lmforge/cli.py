"""The ``lmforge`` command: an explicit table from subcommand to recipe function.

Every command takes ``--config FILE.yaml`` (or a shipped preset name), dotted overrides
(``--optim.lr=1e-3``), ``--debug`` and ``--help``; the help text is generated from the typed
config, so it cannot drift from what the command accepts. Exit codes: 0 success, 2 bad
usage or config, 1 runtime failure, 130 interrupted (after writing a checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmforge import __version__
from lmforge.config import load_config, parse_overrides
from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Command:
    help: str
    config: Callable[[], type[BaseModel]]  # lazy: importing torch costs a second
    run: Callable[[str | None, dict[str, Any]], int]
    defaults: Callable[[], BaseModel] | None = (
        None  # what runs with no --config, if not the class defaults
    )


def _pretrain_config(config_file: str | None, overrides: dict[str, Any]) -> BaseModel:
    from lmforge.recipes.pretrain import resolve_config

    return resolve_config(config_file, overrides)


def _pretrain(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.pretrain import pretrain

    summary = pretrain(_pretrain_config(config_file, overrides))
    if summary:  # {} on ranks other than 0
        _print_pretrain_summary(summary)
    return 0


def _pop_nproc(args: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc N`` / ``--nproc=N`` out of ``args``: a launcher option, not part of the config."""
    for i, a in enumerate(args):
        if a == "--nproc" or a.startswith("--nproc="):
            value, rest = (
                (a.split("=", 1)[1], args[:i] + args[i + 1 :])
                if "=" in a
                else (args[i + 1] if i + 1 < len(args) else "", args[:i] + args[i + 2 :])
            )
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--nproc needs a positive number of processes, got {value!r}")
            return int(value), rest
    return None, args


def _run_under_torchrun(nproc: int, args: list[str]) -> int:
    """``lmforge pretrain --nproc N ...`` → ``torchrun --standalone --nproc_per_node N -m
    lmforge pretrain ...``; torchrun stops every rank when one fails and exits non-zero."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "lmforge", "pretrain", *args]
    print(f"lmforge pretrain: starting {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr)
    code = subprocess.call(cmd)
    if code != 0:
        print(
            f"lmforge pretrain: the {nproc}-process job failed (exit code {code}); the messages "
            "above name the failing rank. Resume from the last checkpoint with the same command "
            "plus --resume.",
            file=sys.stderr,
        )
    return 1 if code not in (0, 2, 130) else code


def _prepare(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.prepare import PrepareConfig, prepare

    meta = prepare(
        load_config(PrepareConfig, config_file=config_file, overrides=overrides, recipe="prepare")
    )
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


def _generate(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.generate import GenerateConfig, generate

    generate(
        load_config(GenerateConfig, config_file=config_file, overrides=overrides, recipe="generate")
    )
    return 0


def _eval(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.evaluate import EvalConfig, evaluate

    report = evaluate(
        load_config(EvalConfig, config_file=config_file, overrides=overrides, recipe="eval")
    )
    print(json.dumps(report, indent=2))
    return 0


def _export(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.export import ExportConfig, export

    out = export(
        load_config(ExportConfig, config_file=config_file, overrides=overrides, recipe="export")
    )
    print(out)
    return 0


def _classify_config(config_file: str | None, overrides: dict[str, Any]) -> BaseModel:
    from lmforge.recipes.classify import resolve_config

    return resolve_config(config_file, overrides)


def _classify(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.classify import classify

    summary = classify(_classify_config(config_file, overrides))
    keep = ("run_dir", "init", "steps", "stop_reason", "best_checkpoint", "eval_data")
    keep += ("eval_accuracy", "eval_f1_macro", "eval_roc_auc", "eval_ece", "wall_seconds", "report")
    print(json.dumps({k: summary[k] for k in keep if k in summary}, indent=2))
    return 0


def _finetune_config(config_file: str | None, overrides: dict[str, Any]) -> BaseModel:
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.runs import saved_config

    if not config_file:  # --resume alone continues with the run's own resolved config
        saved = saved_config(overrides.get("resume"), overrides.get("out_dir"))
        config_file = str(saved) if saved else None
        if saved:  # the run continues in its own folder, wherever it now is
            overrides = {"out_dir": None, **overrides}
    return load_config(
        FinetuneConfig, config_file=config_file, overrides=overrides, recipe="finetune"
    )


def _finetune(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.finetune import finetune, print_summary

    summary = finetune(_finetune_config(config_file, overrides))
    if summary:  # {} on ranks other than 0
        print_summary(summary)
    return 0


def _merge(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.finetune import MergeConfig, merge

    cfg = load_config(MergeConfig, config_file=config_file, overrides=overrides, recipe="merge")
    print(merge(cfg))
    return 0


def _chat(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.chat import ChatConfig, chat

    chat(load_config(ChatConfig, config_file=config_file, overrides=overrides, recipe="chat"))
    return 0


def _estimate(config_file: str | None, overrides: dict[str, Any]) -> int:
    from lmforge.recipes.estimate import print_report, run

    report = run(config_file, overrides)
    print_report(report, as_json=bool(overrides.get("json")))
    return 0


def _config_of(module: str, name: str) -> Callable[[], type[BaseModel]]:
    def get() -> type[BaseModel]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return get


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "train a decoder LM from raw text (no arguments: the CPU demo on the shipped corpus)",
        _config_of("lmforge.recipes.pretrain", "PretrainConfig"),
        _pretrain,
        defaults=lambda: _pretrain_config(None, {}),
    ),
    "data prepare": Command(
        "clean, deduplicate and tokenize text into train/val shards",
        _config_of("lmforge.recipes.prepare", "PrepareConfig"),
        _prepare,
    ),
    "generate": Command(
        "sample text from a checkpoint, streaming to the terminal",
        _config_of("lmforge.recipes.generate", "GenerateConfig"),
        _generate,
    ),
    "eval": Command(
        "perplexity and bits-per-byte of a checkpoint on a token folder, .bin file or text file",
        _config_of("lmforge.recipes.evaluate", "EvalConfig"),
        _eval,
    ),
    "classify": Command(
        "fine-tune a BERT-style encoder for text classification (no arguments: MiniLM on the shipped support tickets)",
        _config_of("lmforge.recipes.classify", "ClassifyConfig"),
        _classify,
        defaults=lambda: _classify_config(None, {}),
    ),
    "export": Command(
        "write a checkpoint as a Hugging Face transformers folder (--format hf)",
        _config_of("lmforge.recipes.export", "ExportConfig"),
        _export,
    ),
    "finetune": Command(
        "fine-tune a checkpoint on instructions: full, lora, dora, qlora or freeze, forgetting "
        "measured (no arguments: LoRA on the shipped instruction suite)",
        _config_of("lmforge.recipes.finetune", "FinetuneConfig"),
        _finetune,
    ),
    "merge": Command(
        "fold a LoRA/DoRA adapter into its base and write a checkpoint folder",
        _config_of("lmforge.recipes.finetune", "MergeConfig"),
        _merge,
    ),
    "chat": Command(
        "chat turn by turn with a checkpoint, its chat template applied (reads stdin)",
        _config_of("lmforge.recipes.chat", "ChatConfig"),
        _chat,
    ),
    "estimate": Command(
        "predict peak memory (by component), time per step and which GPUs fit; --fit BUDGET plans",
        _config_of("lmforge.recipes.estimate", "EstimateConfig"),
        _estimate,
    ),
    "mlm": Command(
        "pretrain a BERT-style encoder by masked-token prediction (no arguments: the CPU demo "
        "on the shipped corpus)",
        _config_of("lmforge.recipes.mlm", "MlmConfig"),
        lambda config_file, overrides: _config_of("lmforge.recipes.mlm", "run_cli")()(
            config_file, overrides
        ),
        defaults=lambda: _config_of("lmforge.recipes.mlm", "resolve_config")()(None, {}),
    ),
}


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in args)
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return getattr(annotation, "__name__", str(annotation))


def config_help(
    model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
) -> list[str]:
    """One line per leaf option: ``--key  type  (default)  description``."""
    lines = []
    for name, field in model.model_fields.items():
        default = getattr(defaults, name) if defaults is not None else field.default
        sub = (
            field.annotation
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            else None
        )
        if sub is not None:
            lines.append(f"\n  {prefix}{name}:")
            lines += config_help(
                sub, f"{prefix}{name}.", default if isinstance(default, BaseModel) else None
            )
            continue
        shown = "required" if field.is_required() else f"default {json.dumps(default, default=str)}"
        lines.append(
            f"    --{prefix}{name}={_type_name(field.annotation)}  ({shown})  {field.description or ''}"
        )
    return lines


def usage() -> str:
    rows = "\n".join(f"  {name:<14} {cmd.help}" for name, cmd in COMMANDS.items())
    return (
        f"lmforge {__version__} — train transformer language models\n\n"
        "usage: lmforge <command> [--config FILE.yaml] [--section.key=value ...] [--debug]\n\n"
        f"commands:\n{rows}\n\n`lmforge <command> --help` lists every option."
    )


def main(argv: list[str] | None = None) -> int:
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
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if "-h" in args or "--help" in args:
        model = command.config()
        defaults = command.defaults() if command.defaults else _defaults(model)
        print(f"lmforge {name}: {command.help}\n\noptions (also settable in --config FILE.yaml):")
        if command.defaults:
            print("    (defaults shown are what runs with no --config)")
        print("    --config=FILE  a YAML file or shipped preset name\n    --debug  show tracebacks")
        if name == "pretrain":
            print("    --nproc=N  run N processes on this machine (torchrun; see dist.strategy)")
        print("\n".join(config_help(model, defaults=defaults)))
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
        config_file = None
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file name or preset name")
            config_file = args[i + 1]
            args = args[:i] + args[i + 2 :]
        for i, a in enumerate(args):
            if a.startswith("--config="):
                config_file = a.split("=", 1)[1]
                args = args[:i] + args[i + 1 :]
                break
        nproc, args = _pop_nproc(args) if name == "pretrain" else (None, args)
        overrides = parse_overrides(args)
        if nproc is not None and nproc > 1 and "RANK" not in os.environ:
            _pretrain_config(config_file, overrides)  # a bad config fails once, here
            full = (["--config", config_file] if config_file else []) + args
            return _run_under_torchrun(nproc, full + (["--debug"] if debug else []))
        return command.run(config_file, overrides)
    except ConfigError as e:
        print(f"lmforge {shown}: {e}", file=sys.stderr)
        return 2
    except (
        _user_errors()
    ) as e:  # bad paths or bad input data: the message says where and what to do
        if debug:
            raise
        from lmforge.errors import CheckpointError

        print(f"lmforge {shown}: {e}", file=sys.stderr)
        return 2 if isinstance(e, CheckpointError) else 1
    except KeyboardInterrupt:
        print(f"lmforge {shown}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one paragraph for users; the traceback with --debug
        from lmforge.errors import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(
                f"lmforge {name}: {e}. Resume with: lmforge {name} --resume={e.checkpoint}",
                file=sys.stderr,
            )
            return 130
        if debug:
            raise
        print(
            f"lmforge {shown}: {type(e).__name__}: {e}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _user_errors() -> tuple[type[Exception], ...]:
    from lmforge.errors import CheckpointError, DataError, NonFiniteLossError

    return (DataError, CheckpointError, NonFiniteLossError)


def _defaults(model: type[BaseModel]) -> BaseModel | None:
    try:
        return model()
    except Exception:  # a config with required fields has no all-default instance
        return None


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
