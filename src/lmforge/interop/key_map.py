"""The shape of every Hugging Face conversion: a plain dict ``{lmforge tensor: Source}``.

Each family module (``hf.py`` decoders, ``hf_bert.py``; later T5, BART, ViT) builds one from its
config; loading and export both read it, so the two directions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Where one lmforge tensor lives in a Hugging Face checkpoint."""

    names: tuple[str, ...]  # HF tensors, concatenated along dim 0 in this order
    rows: tuple[int, ...] = ()  # rows of each name, to split on export (when len(names) > 1)
    transpose: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)


KeyMap = dict[str, Source]
