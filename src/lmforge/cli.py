"""The ``lmforge`` command: an explicit table from subcommand to recipe function.

Every command takes ``--config FILE.yaml`` (or a shipped preset name), dotted overrides
(``--optim.lr=1e-3``), ``--debug`` and ``--help``; the help text is generated from the typed
config, so it cannot drift from what the command accepts. Exit codes: 0 success, 2 bad
usage or config, 1 runtime failure, 130 interrupted (after writing a checkpoint).
"""

from __future__ import annotations

import json
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmforge import __version__
from lmforge.config import ConfigError, load_config, parse_overrides


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
    _print_pretrain_summary(summary)
    return 0


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
    "export": Command(
        "write a checkpoint as a Hugging Face transformers folder (--format hf)",
        _config_of("lmforge.recipes.export", "ExportConfig"),
        _export,
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
        print("\n".join(config_help(model, defaults=defaults)))
        return 0

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
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
        overrides = parse_overrides(args)
        return command.run(config_file, overrides)
    except ConfigError as e:
        print(f"lmforge {name}: {e}", file=sys.stderr)
        return 2
    except (
        _user_errors()
    ) as e:  # bad paths or bad input data: the message says where and what to do
        if debug:
            raise
        from lmforge.train.checkpoint import CheckpointError

        print(f"lmforge {name}: {e}", file=sys.stderr)
        return 2 if isinstance(e, CheckpointError) else 1
    except KeyboardInterrupt:
        print(f"lmforge {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one paragraph for users; the traceback with --debug
        from lmforge.train.loop import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(
                f"lmforge {name}: {e}. Resume with: lmforge {name} --resume={e.checkpoint}",
                file=sys.stderr,
            )
            return 130
        if debug:
            raise
        print(
            f"lmforge {name}: {type(e).__name__}: {e}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _user_errors() -> tuple[type[Exception], ...]:
    from lmforge.data.clean import DataError
    from lmforge.train.checkpoint import CheckpointError
    from lmforge.train.loop import NonFiniteLossError

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
