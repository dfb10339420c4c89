"""``lmforge explain``: attention maps, token attributions and the logit lens for one input.

    lmforge explain --checkpoint runs/pretrain-… --prompt "ROMEO: My" --out_dir explain/
    lmforge explain --checkpoint runs/classify-… --prompt "my invoice is wrong" --out_dir ex/

Decoders: attributions of the next token (the model's top choice, or ``--target``);
sequence classifiers: of the predicted class (or ``--target``, a label name). Writes
``DIR/index.html`` with the pictures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from lmforge.checkpoint.load import load
from lmforge.config import Section, read_yaml
from lmforge.data.tokenizer import special_tokens
from lmforge.diagnose.explain import (
    attribute,
    logit_lens,
    recording_attention,
    target_score,
    write_report,
)
from lmforge.errors import ConfigError


class ExplainConfig(Section):
    checkpoint: str = Field(description="decoder or sequence-classifier checkpoint / run folder")
    prompt: str = Field("", description="the input text to explain (text models)")
    image: str | None = Field(
        None, description="ViT checkpoints: an image file, FILE.npz:INDEX or digits:INDEX"
    )
    block: int = Field(0, description="ViT: Grad-CAM on this block's input; -1 = the last")
    out_dir: str = Field(description="folder for index.html and the PNGs")
    target: str | None = Field(
        None, description="decoders: the next token's text; classifiers: a label name; "
        "null = the model's top prediction",
    )  # fmt: skip
    n_steps: int = Field(64, gt=1, le=2048, description="integrated-gradients integration steps")


def _labels(checkpoint: Path, n: int) -> list[str]:
    saved = read_yaml(checkpoint / "config.yaml") if (checkpoint / "config.yaml").is_file() else {}
    labels = (saved.get("data") or {}).get("labels") if isinstance(saved, dict) else None
    return (
        [str(x) for x in labels]
        if labels and len(labels) == n
        else [f"class {i}" for i in range(n)]
    )


def explain(cfg: ExplainConfig) -> Path:
    """Explain ``cfg.prompt`` under ``cfg.checkpoint``; returns the HTML page's path."""
    model, tokenizer, manifest = load(
        cfg.checkpoint, "cpu", expect=("decoder", "sequence-classifier", "image-classifier")
    )
    if manifest.kind == "image-classifier":  # Grad-CAM + attention rollout (diagnose/gradcam.py)
        from lmforge.diagnose.gradcam import explain_image

        if cfg.image is None:
            raise ConfigError("this is an image classifier: give --image FILE (or digits:INDEX)")
        return explain_image(model, cfg.image, Path(cfg.out_dir), cfg.target, cfg.block)
    decoder = manifest.kind == "decoder"
    ids_list = tokenizer.encode(cfg.prompt).ids
    if not ids_list:
        raise ConfigError("--prompt is empty after tokenization: give some text to explain")
    context = model.cfg.context_length if decoder else model.encoder.cfg.context_length
    if len(ids_list) > context:
        raise ConfigError(f"--prompt is {len(ids_list)} tokens; this model reads at most {context}")
    ids = torch.tensor([ids_list])
    specials = special_tokens(tokenizer)
    baseline_id = next((i for i in (specials.pad, specials.bos, specials.eos) if i is not None), 0)
    with torch.no_grad(), recording_attention() as maps:
        scores = target_score(model, ids, decoder)[0]
    if decoder:
        if cfg.target is None:
            target = int(scores.argmax())
        else:
            target_ids = tokenizer.encode(cfg.target).ids
            if len(target_ids) != 1:
                raise ConfigError(f"--target {cfg.target!r} is {len(target_ids)} tokens; give "
                                  "text that is one token (e.g. ' the')")  # fmt: skip
            target = target_ids[0]
        target_text = repr(tokenizer.decode([target]))
        names = None
    else:
        names = _labels(manifest.path, scores.numel())
        if cfg.target is None:
            target = int(scores.argmax())
        elif cfg.target in names:
            target = names.index(cfg.target)
        else:
            raise ConfigError(f"--target {cfg.target!r} is not a label of this classifier "
                              f"({', '.join(names)})")  # fmt: skip
        target_text = names[target]
    attribution = attribute(model, ids, target, baseline_id, decoder, cfg.n_steps)
    tokens = [tokenizer.decode([i]) for i in ids_list]
    lens = None
    if decoder:
        lens = [[tokenizer.decode([i]) for i in row] for row in logit_lens(model, ids)]
    title = f"lmforge explain: {Path(cfg.checkpoint).name}"
    return write_report(Path(cfg.out_dir), title, tokens, maps, attribution, target_text, lens)
