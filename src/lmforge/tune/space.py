"""A search space in YAML: dotted config keys → distributions, checked against the recipe's config.

    optim.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
    model.n_layer: {type: int, low: 2, high: 8}
    sched.name: {type: categorical, choices: [cosine, linear]}

Every key must be one the recipe's config has, and every value the distribution can give
must validate — both are checked before the first trial starts, naming the file and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lmforge.config import read_yaml
from lmforge.errors import ConfigError

_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def read_space(path: str | Path) -> dict[str, BaseDistribution]:
    """The distributions of SPACE.yaml, by dotted key; a bad entry is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file (a YAML mapping of config keys to "
                          "distributions, e.g. optim.lr: {type: float, low: 1e-4, high: 3e-2, "
                          "log: true})")  # fmt: skip
    raw = read_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: the search space is empty")
    return {key: _distribution(path, key, spec) for key, spec in raw.items()}


def _distribution(path: Path, key: str, spec: Any) -> BaseDistribution:
    where = f"{path}: {key}"
    if not isinstance(spec, dict) or spec.get("type") not in _FIELDS:
        raise ConfigError(f"{where}: expected a mapping with type float, int or categorical, "
                          f"got {spec!r}")  # fmt: skip
    kind = spec["type"]
    if unknown := set(spec) - _FIELDS[kind]:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} for type {kind} "
                          f"(allowed: {sorted(_FIELDS[kind])})")  # fmt: skip
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("choices must be a non-empty list")
            return CategoricalDistribution(choices)
        if "low" not in spec or "high" not in spec:
            raise ValueError("low and high are required")
        cls = FloatDistribution if kind == "float" else IntDistribution
        cast = float if kind == "float" else int
        kw: dict[str, Any] = {"log": bool(spec.get("log", False))}
        if spec.get("step") is not None:
            kw["step"] = cast(spec["step"])
        return cls(cast(spec["low"]), cast(spec["high"]), **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["optim"]["lr"] = value`` for ``key = "optim.lr"`` (sections created as needed)."""
    *sections, last = key.split(".")
    node = config
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise ConfigError(f"search space key {key!r}: {s} is not a config section")
    node[last] = value


def extremes(dist: BaseDistribution) -> list[Any]:
    """Values at the edges of ``dist``: what the pre-flight check validates."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]  # type: ignore[attr-defined]


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """One value per key, drawn by the study's sampler."""
    values: dict[str, Any] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, list(d.choices))
        elif isinstance(d, IntDistribution):
            values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            assert isinstance(d, FloatDistribution)
            values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return values


def grid(space: dict[str, BaseDistribution], path: Path | str) -> dict[str, list[Any]]:
    """Every value of every key, for the grid sampler: choices, or low..high by step."""
    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            out[key] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            out[key] = [d.low + i * d.step for i in range(n + 1)]
        else:
            raise ConfigError(f"{path}: {key}: the grid sampler needs choices, or a step "
                              "(and no log) for numbers")  # fmt: skip
    return out
