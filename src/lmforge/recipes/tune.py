"""``lmforge tune``: hyper-parameter search over any recipe's config keys (Optuna).

    lmforge tune --recipe pretrain --space space.yaml --n_trials 20 --out_dir tune-lr \\
        --train.max_steps=200

writes ``tune-lr/best_config.yaml`` (runs as is: ``lmforge pretrain --config
tune-lr/best_config.yaml``), ``tune-lr/trials.csv``, plots, and one folder per trial. Options
other than tune's own go to the recipe's config, as they would on its own command line. Run
the same command again to resume a killed search; point ``--storage`` at a database URL
(e.g. ``postgresql://user@host/db``) and start it on several machines to share one study.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from lmforge.config import Section, to_yaml
from lmforge.errors import ConfigError

try:
    import optuna
except ModuleNotFoundError as e:  # an optional dependency: say how to get it
    raise ConfigError("lmforge tune needs Optuna: pip install 'lmforge[tune]'") from e
from lmforge.tune.space import extremes, grid, read_space, set_dotted, suggest
from lmforge.tune.study import TrialFailed, finished, recover_interrupted, run_trial

log = logging.getLogger(__name__)


class TuneConfig(Section):
    recipe: Literal["pretrain", "finetune", "classify"] = Field(description="the command to tune")
    space: str = Field(description="YAML: dotted config key → {type: float|int|categorical, ...}")
    n_trials: int = Field(gt=0, description="finished (complete or pruned) trials to reach")
    out_dir: str = Field(description="study folder: study.db, trials.csv, best_config.yaml")
    metric: str = Field("val_loss", description="the eval metric to optimise (metrics.jsonl)")
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimize for losses, perplexity, bpb; maximize otherwise"
    )
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="search strategy")
    pruner: Literal["median", "halving", "none"] = Field(
        "median", description="stop poor trials early on their intermediate evals"
    )
    n_jobs: int = Field(1, gt=0, description="trials at once on this machine (cores are split)")
    storage: str | None = Field(
        None, description="Optuna storage URL; null = sqlite in out_dir (shared by several "
        "machines with a database URL)",
    )  # fmt: skip
    seed: int = Field(0, description="the sampler's seed")


def _direction(cfg: TuneConfig) -> str:
    if cfg.direction != "auto":
        return cfg.direction
    lower_better = any(w in cfg.metric for w in ("loss", "ppl", "bpb", "perplexity"))
    return "minimize" if lower_better else "maximize"


def _sampler(cfg: TuneConfig, space: dict) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space, cfg.space), seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(5, cfg.n_trials))


def _pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def base_config(recipe: str, config_file: str | None, overrides: dict[str, Any]) -> dict:
    """The recipe's resolved config as a plain dict (what its own command line would run)."""
    from lmforge.cli import resolve_config  # the command registry: tune runs commands by name

    cfg = resolve_config(recipe, config_file, overrides)
    return yaml.safe_load(to_yaml(cfg))


def check_space(recipe: str, base: dict, space: dict, space_path: str) -> None:
    """Every key exists in the recipe's config and every edge value validates."""
    from lmforge.cli import COMMANDS

    config_cls = COMMANDS[recipe].config()
    for key, dist in space.items():
        for value in extremes(dist):
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value)
            try:
                config_cls.model_validate(trial)
            except Exception as e:  # pydantic's message names the field
                first = str(e).splitlines()
                raise ConfigError(
                    f"{space_path}: {key}={value!r} is not valid for `lmforge {recipe}`: "
                    + " ".join(line.strip() for line in first[1:3])
                ) from None


def split_options(overrides: dict[str, Any]) -> tuple[TuneConfig, dict[str, Any]]:
    """tune's own options, and the rest: the recipe's overrides."""
    own = {k: v for k, v in overrides.items() if k in TuneConfig.model_fields}
    rest = {k: v for k, v in overrides.items() if k not in TuneConfig.model_fields}
    try:
        return TuneConfig.model_validate(own), rest
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:]]
        raise ConfigError(
            "lmforge tune: " + "; ".join(lines[:4]) + " (see lmforge tune --help)"
        ) from None


def tune(cfg: TuneConfig, config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the search until ``cfg.n_trials`` trials have finished; write its outputs."""
    out = Path(cfg.out_dir).resolve()
    space = read_space(cfg.space)
    base = base_config(cfg.recipe, config_file, overrides)
    check_space(cfg.recipe, base, space, cfg.space)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=out.name, storage=cfg.storage or f"sqlite:///{out / 'study.db'}",
        sampler=_sampler(cfg, space), pruner=_pruner(cfg), direction=_direction(cfg),
        load_if_exists=True,
    )  # fmt: skip
    if n := recover_interrupted(study):
        print(f"tune: {n} trial(s) interrupted by a stopped search will run again")
    threads = max(1, (os.cpu_count() or 1) // cfg.n_jobs)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("tuner_pid", os.getpid())
        params = suggest(trial, space)
        config = copy.deepcopy(base)
        for key, value in params.items():
            set_dotted(config, key, value)
        trial_dir = out / f"trial-{trial.number:03d}"
        config["out_dir"] = str(trial_dir / "run")
        config.setdefault("train", {})["num_threads"] = threads
        try:
            value = run_trial(trial, cfg.recipe, config, trial_dir, cfg.metric)
        except TrialFailed as e:
            print(f"tune: trial {trial.number} failed: {e}")
            raise
        print(f"tune: trial {trial.number} {params} → {cfg.metric} {value:.4g}")
        return value

    def enough(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if finished(study) >= cfg.n_trials:
            study.stop()

    if finished(study) < cfg.n_trials:
        study.optimize(
            objective, n_jobs=cfg.n_jobs, callbacks=[enough], catch=(TrialFailed,),
            gc_after_trial=False,
        )  # fmt: skip
    return write_outputs(study, cfg, out)


def write_outputs(study: optuna.Study, cfg: TuneConfig, out: Path) -> dict[str, Any]:
    """trials.csv, best_config.yaml and the plots; returns a summary."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", cfg.metric, *keys, "seconds", "run_dir"])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if (
                t.datetime_complete and t.datetime_start) else ""  # fmt: skip
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                        *(t.params.get(k, "") for k in keys), seconds,
                        t.user_attrs.get("run_dir", "")])  # fmt: skip
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"tune: no trial completed (see {out}/trial-*/output.log)")
    best = study.best_trial
    config = yaml.safe_load((out / f"trial-{best.number:03d}" / "config.yaml").read_text())
    config["out_dir"] = None  # a new run folder when the best config is run
    (out / "best_config.yaml").write_text(
        f"# lmforge tune: best of {len(complete)} complete trials (trial {best.number}, "
        f"{cfg.metric} {best.value:.6g}); run: lmforge {cfg.recipe} --config {out}/best_config.yaml\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    _plots(study, out)
    return {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "complete": len(complete), "trials": len(trials), "out_dir": str(out)}  # fmt: skip


def _plots(study: optuna.Study, out: Path) -> None:
    """Optimisation history, parameter importances, parallel coordinates (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
             "parallel": ovm.plot_parallel_coordinate}  # fmt: skip
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks these plots experimental
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ trials
                log.info("tune: no %s plot: %s", name, e)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
