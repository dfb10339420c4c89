"""The shape of every Hugging Face conversion: a plain dict ``{lmforge tensor: Source}``.

Each family module (``hf.py`` decoders, ``hf_bert.py``, ``hf_seq2seq.py``, ``hf_vit.py``) builds
one from its config; loading and export both read it, so the two directions cannot drift apart.
``load_by_key_map`` fills a model from a whole checkpoint through one, strictly;
``export_by_key_map`` gives a model's tensors under the Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import CheckpointError


@dataclass(frozen=True)
class Source:
    """Where one lmforge tensor lives in a Hugging Face checkpoint."""

    names: tuple[str, ...]  # HF tensors, concatenated along dim 0 in this order
    rows: tuple[int, ...] = ()  # rows of each name, to split on export (when len(names) > 1)
    transpose: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)


KeyMap = dict[str, Source]


def load_by_key_map(
    model: torch.nn.Module,
    key_map: KeyMap,
    tensors: dict[str, torch.Tensor],
    source: str,
    ignored: tuple[str, ...] = (),
) -> None:
    """Assemble the state dict through ``key_map`` and load it strictly: every checkpoint tensor
    must find its place (unless its name starts with one of ``ignored``) and every place must be
    filled; otherwise a CheckpointError naming ``source`` and examples."""
    used = {n for src in key_map.values() for n in src.names}
    extra = [n for n in tensors if n not in used and not n.startswith(ignored)]
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} tensors lmforge has no place for, e.g. {extra[:5]}"
        )
    missing = sorted(n for n in used if n not in tensors)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    state = {}
    for ours, src in key_map.items():
        parts = [tensors[n].float() for n in src.names]
        state[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit its config.json: {e}") from None


def export_by_key_map(
    state: dict[str, torch.Tensor], key_map: KeyMap, clone: bool = False
) -> dict[str, torch.Tensor]:
    """``state`` (lmforge names) → the Hugging Face tensors of ``key_map``, ready for
    ``save_file``: fused tensors split into their rows (as copies: split views share storage,
    which safetensors refuses), transposed where the checkpoint stores (in, out). ``clone``
    copies the unsplit tensors too (for models whose state dict holds tied tensors twice)."""
    out: dict[str, torch.Tensor] = {}
    for name, src in key_map.items():
        tensor = state[name].detach().cpu()
        if len(src.names) > 1:
            parts = [p.clone() for p in tensor.split(list(src.rows))]
        else:
            parts = [tensor.clone() if clone else tensor]
        for hf_name, part in zip(src.names, parts, strict=True):
            out[hf_name] = (part.T if src.transpose else part).contiguous()
    return out
