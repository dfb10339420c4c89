"""The training doctor: what went wrong in a run, with the evidence and what to do about it.

``diagnose(run_dir)`` reads the run folder ``fit`` writes — ``metrics.jsonl`` (train events with
loss, lr, gradient norm, the time spent waiting for data; eval events; skipped non-finite
steps; per-layer statistics when the run had ``train.log_layer_stats=true``) and ``config.yaml``
— and returns ``Finding``s. Each rule below states the pattern it looks for; the thresholds
were chosen on deliberately broken runs (tests/diagnose/test_doctor.py: LR ×100, a spike with
no clipping, a tiny dataset that overfits, a frozen model) and must stay silent on a healthy run.

Losses are compared through medians of a few points, never single values: a single noisy
batch is not a diagnosis.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.atomic import atomic_write_text
from lmforge.errors import DataError

Severity = Literal["error", "warning", "info"]


@dataclass
class Finding:
    kind: str  # overfitting, divergence, loss_spike, exploding_gradients, ...
    severity: Severity
    evidence: str  # the steps and values that show it
    remedy: str  # what to change, naming the config keys
    steps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """What the rules read, parsed once."""

    train: list[dict[str, Any]]  # events with a training loss, in step order
    evals: list[dict[str, Any]]  # events with val_loss
    skipped: list[dict[str, Any]]  # non-finite steps
    layers: list[tuple[int, dict[str, dict[str, float]]]]  # (step, per-layer statistics)
    config: dict[str, Any]

    def setting(self, section: str, key: str) -> Any:
        value = self.config.get(section, {})
        return value.get(key) if isinstance(value, dict) else None


def read_run(run_dir: str | Path) -> Run:
    """Parse a run folder. A half-written last line (a live run) is skipped; any other bad line
    is a ``DataError`` naming it."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(
            f"{run_dir}: no metrics.jsonl — give the folder of a training run "
            "(lmforge pretrain/finetune/classify/mlm write one)"
        )
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # being written right now
                continue
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg}); the file is damaged") from e
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    train = [e for e in events if "loss" in e and "val_loss" not in e and "skipped" not in e]
    return Run(
        train=sorted(train, key=lambda e: e["step"]),
        evals=sorted((e for e in events if "val_loss" in e), key=lambda e: e["step"]),
        skipped=[e for e in events if "skipped" in e],
        layers=[(e["step"], e["layers"]) for e in train if isinstance(e.get("layers"), dict)],
        config=config,
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _clip_advice(run: Run) -> str:
    clip = run.setting("train", "grad_clip")
    if clip == 0:
        return "gradient clipping is off: set train.grad_clip=1.0"
    return f"clip harder (train.grad_clip={clip or 1.0} → {(clip or 1.0) / 2:g})"


def nonfinite_steps(run: Run) -> list[Finding]:
    if not run.skipped:
        return []
    steps = [e["step"] for e in run.skipped]
    return [Finding(
        "nonfinite", "error",
        f"{len(steps)} step(s) had a non-finite loss or gradient and were skipped: steps "
        f"{', '.join(map(str, steps[:10]))}{' …' if len(steps) > 10 else ''}",
        "lower optim.lr, lengthen sched.warmup_steps, keep clipping on; with fp16 prefer "
        "train.precision=bf16-mixed; check the data at those steps",
        steps,
    )]  # fmt: skip


def loss_trend(run: Run) -> list[Finding]:
    """Divergence (the loss ends above where it started, or loses a quarter of its progress) and
    no learning (the loss hardly moved)."""
    losses = [(e["step"], e["loss"]) for e in run.train]
    if len(losses) < 8:
        return []
    k = max(3, len(losses) // 10)
    start = _median([v for _, v in losses[:3]])
    end_values = [v for _, v in losses[-k:]]
    end = _median(end_values) if all(_finite(v) for v in end_values) else float("inf")
    smooth = [_median([v for _, v in losses[i : i + 3]]) for i in range(len(losses) - 2)]
    best_i = min(range(len(smooth)), key=lambda i: smooth[i] if _finite(smooth[i]) else 1e30)
    best, best_step = smooth[best_i], losses[best_i + 1][0]
    lr = run.setting("optim", "lr")
    lr_text = f" (optim.lr={lr})" if lr is not None else ""
    if (
        end > start * 0.98
        and max(v for v in smooth if _finite(v)) > start * 1.2
        or not _finite(end)
    ):
        return [Finding(
            "divergence", "error",
            f"the training loss went from {start:.3f} to {end:.3f} at the end "
            f"(best {best:.3f} at step {best_step}): the run diverged{lr_text}",
            "lower optim.lr (÷3 to ÷10), lengthen sched.warmup_steps; " + _clip_advice(run),
            [best_step],
        )]  # fmt: skip
    if end > best * 1.5 and best < start * 0.9 and end - best > 0.25 * (start - best):
        return [Finding(
            "divergence", "error",
            f"the loss fell to {best:.3f} (step {best_step}) and rose back to {end:.3f}: "
            f"training became unstable{lr_text}",
            "lower optim.lr, decay it further (sched.min_lr_ratio), " + _clip_advice(run),
            [best_step],
        )]  # fmt: skip
    if (start - end) / abs(start) < 0.02:
        frozen = ""
        ratios = _layer_values(run, "update_ratio")
        if ratios and max(ratios) < 1e-6:
            frozen = f"; the weights did not change (update/weight ratio ≤ {max(ratios):.1e})"
        return [Finding(
            "underfitting", "error",
            f"the training loss hardly moved: {start:.3f} → {end:.3f} over "
            f"{losses[-1][0]} steps{lr_text}{frozen}: the model is not learning",
            "check that the parameters are trainable (not frozen) and that optim.lr is not 0 "
            "or tiny (try ×10); check that inputs and targets line up",
        )]  # fmt: skip
    return []


def loss_spikes(run: Run) -> list[Finding]:
    """A logged loss far above the median of the few before it (and not the run's start)."""
    losses = [(e["step"], e["loss"]) for e in run.train if _finite(e["loss"])]
    spikes = []
    for i in range(8, len(losses)):
        window = [v for _, v in losses[i - 8 : i]]
        med = _median(window)
        mad = _median([abs(v - med) for v in window])
        step, value = losses[i]
        if value > med * 1.5 and value - med > 8 * max(mad, 1e-3 * med):
            spikes.append((step, value, med))
    if not spikes:
        return []
    worst = max(spikes, key=lambda s: s[1] / s[2])
    return [Finding(
        "loss_spike", "warning",
        f"{len(spikes)} loss spike(s); the largest at step {worst[0]}: {worst[1]:.3f} against "
        f"{worst[2]:.3f} just before",
        _clip_advice(run) + "; lower optim.lr or lengthen the warm-up; look at the batches at "
        "those steps (bad or duplicated data)",
        [s[0] for s in spikes],
    )]  # fmt: skip


def gradient_norms(run: Run) -> list[Finding]:
    """Exploding (a norm far above its running median) and vanishing (per layer) gradients."""
    found = []
    bursts = _grad_bursts(run)
    if bursts:
        worst = max(bursts, key=lambda b: b[1] / b[2])
        found.append(Finding(
            "exploding_gradients", "warning",
            f"gradient norm {worst[1]:.3g} at step {worst[0]} against a median of {worst[2]:.3g} "
            f"before it ({len(bursts)} step(s) above 10× the running median)",
            _clip_advice(run) + "; lower optim.lr; a longer warm-up; check the init and residual "
            "scaling",
            [b[0] for b in bursts],
        ))  # fmt: skip
    blocks = _per_layer_median(run, "grad_norm", only_blocks=True)
    if len(blocks) >= 2:
        low = min(blocks, key=blocks.__getitem__)
        high = max(blocks, key=blocks.__getitem__)
        if blocks[high] > 0 and blocks[low] < 1e-3 * blocks[high]:
            found.append(Finding(
                "vanishing_gradients", "warning",
                f"median gradient norm of {low} is {blocks[low]:.2e}, of {high} "
                f"{blocks[high]:.2e}: the gradient hardly reaches {low}",
                "keep pre-norm blocks and residual connections; check that the layer is not "
                "frozen; a smaller init scale for residual outputs; a higher optim.lr",
            ))  # fmt: skip
    return found


def _layer_values(run: Run, key: str) -> list[float]:
    return [s[key] for _, layers in run.layers for s in layers.values() if _finite(s.get(key))]


def _per_layer_median(run: Run, key: str, only_blocks: bool = False) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for _, layers in run.layers:
        for name, s in layers.items():
            if _finite(s.get(key)) and (not only_blocks or name.startswith("blocks.")):
                values.setdefault(name, []).append(s[key])
    return {name: _median(v) for name, v in values.items()}


def _grad_bursts(run: Run) -> list[tuple[int, float, float]]:
    """(step, norm, running median) where the gradient norm exceeds 10× the median of the 8
    logged norms before it."""
    norms = [(e["step"], e["grad_norm"]) for e in run.train if _finite(e.get("grad_norm"))]
    bursts = []
    for i in range(8, len(norms)):
        med = _median([v for _, v in norms[i - 8 : i]])
        if norms[i][1] > 10 * med and med > 0:
            bursts.append((norms[i][0], norms[i][1], med))
    return bursts


def learning_rate(run: Run) -> list[Finding]:
    """Too high: at least two signs of it — repeated gradient bursts, the loss rising above its
    start early on, validation loss going up and down, updates far above ~1e-3 of the weights.
    Too low: updates far below that."""
    lr = run.setting("optim", "lr")
    at = f" at optim.lr={lr}" if lr is not None else ""
    signs = []
    if len(bursts := _grad_bursts(run)) >= 3:
        signs.append(f"{len(bursts)} gradient-norm bursts above 10× the running median")
    losses = [e["loss"] for e in run.train if _finite(e["loss"])]
    if len(losses) >= 10:
        start = _median(losses[:3])
        early = losses[: max(5, len(losses) // 5)]
        peak = max(_median(early[i : i + 3]) for i in range(len(early) - 2))
        if peak > start * 1.05:
            signs.append(f"the loss rose from {start:.3f} to {peak:.3f} in the first steps")
    vals = [e["val_loss"] for e in run.evals if _finite(e["val_loss"])]
    rises = sum(b > a * 1.01 for a, b in zip(vals, vals[1:], strict=False))
    if rises >= 2 and len(vals) >= 4:
        signs.append(f"val loss went up at {rises} of {len(vals) - 1} evaluations")
    ratios = _per_layer_median(run, "update_ratio")
    typical = _median(list(ratios.values())) if ratios else float("nan")
    if typical > 3e-2:
        signs.append(f"each step changes the weights by {typical:.1e} of their size (~1e-3 is "
                     "typical)")  # fmt: skip
    if len(signs) >= 2:
        return [Finding(
            "lr_too_high", "warning",
            "; ".join(signs) + at,
            "lower optim.lr (÷3 to ÷10) and lengthen sched.warmup_steps; " + _clip_advice(run),
            [b[0] for b in bursts],
        )]  # fmt: skip
    if 0 < typical < 1e-5:
        return [Finding(
            "lr_too_low", "warning",
            f"each step changes the weights by only {typical:.1e} of their size (~1e-3 is "
            f"typical){at}",
            "raise optim.lr (try ×10) or check that the learning-rate schedule is not at 0",
        )]  # fmt: skip
    return []


def dead_units(run: Run) -> list[Finding]:
    if not run.layers:
        return []
    step, last = run.layers[-1]
    dead = {n: s["dead_frac"] for n, s in last.items() if _finite(s.get("dead_frac"))}
    bad = {n: f for n, f in dead.items() if f > 0.5}
    if not bad:
        return []
    text = ", ".join(f"{n} {100 * f:.0f} %" for n, f in sorted(bad.items()))
    return [Finding(
        "dead_units", "warning",
        f"at step {step}, MLP units inactive on every token of the batch: {text}",
        "lower optim.lr (large updates push units into the dead region), a longer warm-up",
        [step],
    )]  # fmt: skip


def overfitting(run: Run) -> list[Finding]:
    """Validation loss rising from its best while the training loss keeps falling."""
    evals = [e for e in run.evals if _finite(e["val_loss"])]
    if len(evals) < 3:
        return []
    best = min(evals, key=lambda e: e["val_loss"])
    last = evals[-1]
    if last is best or last["val_loss"] < best["val_loss"] * 1.03:
        return []

    def train_at(step: int) -> float:
        near = [e["loss"] for e in run.train if abs(e["step"] - step) <= 5 and _finite(e["loss"])]
        return _median(near)

    t_best, t_last = train_at(best["step"]), train_at(last["step"])
    if not (t_last < t_best):
        return []  # both rose: that is instability, not overfitting
    patience = run.setting("train", "early_stop_patience")
    stop = (
        "early stopping is off: set train.early_stop_patience=3; "
        if not patience
        else f"early stopping (patience {patience}) is on; "
    )
    return [Finding(
        "overfitting", "warning",
        f"val loss rose from {best['val_loss']:.3f} (step {best['step']}) to "
        f"{last['val_loss']:.3f} (step {last['step']}) while the training loss fell from "
        f"{t_best:.3f} to {t_last:.3f}: the gap grew to {last['val_loss'] - t_last:.3f}",
        stop + "use the best checkpoint (step " + str(best["step"]) + "); more data or "
        "augmentation, higher optim.weight_decay, model.dropout, fewer steps or a smaller model",
        [best["step"], last["step"]],
    )]  # fmt: skip


def data_wait(run: Run) -> list[Finding]:
    fracs = [e["data_frac"] for e in run.train if _finite(e.get("data_frac"))]
    if len(fracs) < 3 or _median(fracs) < 0.25:
        return []
    return [Finding(
        "data_bottleneck", "warning",
        f"the loop waited for batches {100 * _median(fracs):.0f} % of its time (median over "
        f"{len(fracs)} logged windows): the model waits for the input pipeline",
        "prepare the data once into token shards (lmforge prepare) instead of tokenizing on "
        "the fly; fewer, larger batches (train.batch_size) amortise the per-batch cost",
    )]  # fmt: skip


RULES = [nonfinite_steps, loss_trend, loss_spikes, gradient_norms, learning_rate, dead_units,
         overfitting, data_wait]  # fmt: skip


def diagnose(run_dir: str | Path) -> list[Finding]:
    """Every finding for the run in ``run_dir``, most severe first."""
    run = read_run(run_dir)
    findings = [f for rule in RULES for f in rule(run)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def write_report(run_dir: str | Path, findings: list[Finding]) -> Path:
    """``doctor.md`` (and ``doctor.png``: loss, val loss and gradient norm with the findings'
    steps marked) in the run folder; returns the markdown's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [e["step"] for e in run.train]
    ax_loss.plot(steps, [e["loss"] for e in run.train], label="train loss", lw=1)
    if run.evals:
        ax_loss.plot([e["step"] for e in run.evals], [e["val_loss"] for e in run.evals],
                     "o-", label="val loss")  # fmt: skip
    ax_grad.semilogy(steps, [max(e.get("grad_norm", float("nan")), 1e-12) for e in run.train],
                     lw=1, label="gradient norm")  # fmt: skip
    for f in findings:
        for s in f.steps[:20]:
            ax_loss.axvline(s, color="red" if f.severity == "error" else "orange", alpha=0.4)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_grad.set_ylabel("gradient norm")
    ax_grad.set_xlabel("step")
    ax_loss.legend()
    fig.tight_layout()
    png = run_dir / "doctor.png"
    fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    png.with_suffix(".tmp.png").replace(png)
    lines = [f"# Training doctor: {run_dir.name}", ""]
    if not findings:
        lines.append("No problems found: the loss fell without spikes, divergence or a growing "
                     "validation gap.")  # fmt: skip
    for f in findings:
        lines += [f"## {f.severity}: {f.kind}", "", f"**Evidence.** {f.evidence}", "",
                  f"**Remedy.** {f.remedy}", ""]  # fmt: skip
    lines += ["", "![loss and gradient norm](doctor.png)", ""]
    path = run_dir / "doctor.md"
    atomic_write_text(path, "\n".join(lines))
    return path
