"""What a model looks at: attention maps, token attributions and the logit lens.

- Attention maps: every layer's and head's attention probabilities for one input, recorded
  while the model runs (``recording_attention``), for decoders and encoders alike.
- Attributions (Captum, the library made for this): integrated gradients of the target's
  log-probability with respect to the token embeddings (baseline: every token replaced by the
  pad/BOS id), and gradient × input. Integrated gradients are complete: the attributions sum
  to f(input) − f(baseline), up to the integral's approximation error (``delta``).
- Logit lens (decoders): what each layer's residual stream would predict if the final norm and
  the output head were applied to it.

``write_report`` draws them as PNGs and one HTML page with the tokens coloured by attribution.
"""

from __future__ import annotations

import contextlib
import html
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.models import layers


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, is_causal: bool, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q kᵀ / √d) with ``attend``'s masking: (B, nh, T, hd), (B, nkv, S, hd) → (B, nh, T, S)."""
    nh, nkv, T, S = q.size(1), k.size(1), q.size(2), k.size(2)
    k = k.repeat_interleave(nh // nkv, dim=1)
    att = (q.float() @ k.float().transpose(-1, -2)) * q.size(-1) ** -0.5
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(dim=-1)


@contextlib.contextmanager
def recording_attention() -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention call appends its probabilities (B, nh, T, S) to the
    list it yields, one per layer in order.

    Swaps ``layers.attend`` (the one function every attention module calls) for a recording
    one and restores it after: the model code stays free of inspection hooks, and the model
    computes exactly what it does otherwise.
    """
    maps: list[torch.Tensor] = []
    original = layers.attend

    def attend(q, k, v, is_causal, mask=None, dropout=0.0):  # type: ignore[no-untyped-def]
        maps.append(attention_probabilities(q.detach(), k.detach(), is_causal, mask))
        return original(q, k, v, is_causal, mask, dropout)

    layers.attend = attend
    try:
        yield maps
    finally:
        layers.attend = original


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.tok_emb if hasattr(model, "tok_emb") else model.encoder.tok_emb


def target_score(model: nn.Module, ids: torch.Tensor, decoder: bool) -> torch.Tensor:
    """(B, V) log-probabilities of the next token (decoders) or of each class (classifiers)."""
    logits = model(ids)
    return (logits[:, -1] if decoder else logits).float().log_softmax(dim=-1)


@dataclass
class Attribution:
    integrated_gradients: list[float]  # per token, sums to about score - baseline_score
    gradient_x_input: list[float]
    score: float  # the target's log-probability on the input
    baseline_score: float
    delta: float  # completeness error of the integral


def attribute(
    model: nn.Module, ids: torch.Tensor, target: int, baseline_id: int, decoder: bool,
    n_steps: int = 64,
) -> Attribution:  # fmt: skip
    """Token attributions of ``target``'s log-probability for one input ``ids`` (1, T)."""
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    def forward(x: torch.Tensor) -> torch.Tensor:
        return target_score(model, x, decoder)

    emb = _embedding(model)
    baseline = torch.full_like(ids, baseline_id)
    lig = LayerIntegratedGradients(forward, emb)
    ig, delta = lig.attribute(ids, baselines=baseline, target=target, n_steps=n_steps,
                              return_convergence_delta=True)  # fmt: skip
    gxi = LayerGradientXActivation(forward, emb).attribute(ids, target=target)
    with torch.no_grad():
        score = float(forward(ids)[0, target])
        base = float(forward(baseline)[0, target])
    return Attribution(ig.sum(-1)[0].tolist(), gxi.sum(-1)[0].tolist(), score, base,
                       float(delta.abs().sum()))  # fmt: skip


def logit_lens(model: nn.Module, ids: torch.Tensor) -> list[list[int]]:
    """For each layer (after it), each position's top next-token id through the final norm and
    head: what the model 'thinks so far'."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(ids)
            return [model.lm_head(model.norm_f(h)).argmax(-1)[0].tolist() for h in outs]
    finally:
        for h in hooks:
            h.remove()


def _heatmaps(maps: list[torch.Tensor], tokens: list[str], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for layer, att in enumerate(maps):
        heads = att.size(1)
        cols = min(heads, 4)
        rows = math.ceil(heads / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            ax.axis("off")
            if h < heads:
                ax.imshow(att[0, h].numpy(), cmap="viridis", vmin=0, vmax=1)
                ax.set_title(f"layer {layer} head {h}", fontsize=8)
                if len(tokens) <= 24:
                    ax.axis("on")
                    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                    ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        fig.tight_layout()
        name = f"attention_layer{layer}.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def _coloured(tokens: list[str], scores: list[float]) -> str:
    top = max((abs(s) for s in scores), default=1.0) or 1.0
    spans = []
    for tok, s in zip(tokens, scores, strict=True):
        a = min(1.0, abs(s) / top)
        rgb = "220,50,47" if s > 0 else "38,139,210"
        spans.append(f'<span title="{s:+.4f}" style="background: rgba({rgb},{a:.2f})">'
                     f"{html.escape(tok)}</span>")  # fmt: skip
    return "".join(spans)


def write_report(
    out_dir: Path, title: str, tokens: list[str], maps: list[torch.Tensor],
    attribution: Attribution, target_text: str, lens: list[list[str]] | None,
) -> Path:  # fmt: skip
    """PNGs and ``index.html`` in ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _heatmaps(maps, tokens, out_dir)
    a = attribution
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto} span{padding:"
        "2px 1px;font-family:monospace;white-space:pre} td,th{padding:2px 6px;font-family:"
        "monospace;font-size:12px} img{max-width:100%}</style>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Target: <b>{html.escape(target_text)}</b> — log-probability {a.score:.4f} "
        f"(baseline {a.baseline_score:.4f}; integrated-gradients completeness error "
        f"{a.delta:.2e}). Red raises it, blue lowers it.</p>",
        "<h2>Integrated gradients</h2><p id='ig'>"
        + _coloured(tokens, a.integrated_gradients)
        + "</p>",
        "<h2>Gradient × input</h2><p id='gxi'>" + _coloured(tokens, a.gradient_x_input) + "</p>",
    ]
    if lens is not None:
        head = "".join(f"<th>{html.escape(t)}</th>" for t in tokens)
        body = "".join(
            f"<tr><th>after layer {i}</th>" + "".join(f"<td>{html.escape(t)}</td>" for t in row)
            + "</tr>" for i, row in enumerate(lens)
        )  # fmt: skip
        parts.append("<h2>Logit lens: each layer's top next token</h2><table><tr><th></th>"
                     f"{head}</tr>{body}</table>")  # fmt: skip
    parts.append("<h2>Attention</h2>" + "".join(f"<img src='{n}' alt='{n}'>" for n in images))
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
