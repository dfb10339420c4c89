"""lmforge: train transformer language models — data → models → train → checkpoint → eval.

``lmforge.load(path)`` → (model, tokenizer, manifest) reads any checkpoint
(``checkpoint/load.py``); it is imported on first use so that ``import lmforge`` (and
``lmforge --help``) stays cheap: torch costs a second to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmforge.checkpoint.load import load

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from lmforge.checkpoint.load import load

        return load
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
