"""Language-model metrics: loss, perplexity and bits-per-byte over a whole token stream.

Bits-per-byte divides the summed loss (nats) by ln 2 and by the UTF-8 bytes of the evaluated
text, so models with different tokenizers (character-level, BPE of any size) compare.
Training-time evaluation and ``lmforge eval`` both use these functions. Bits-per-byte is only
right when the tokens were made by the model's own tokenizer: ``check_shard_tokenizer`` refuses
prepared shards of another one (whose ids index a different vocabulary).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.loader import iter_eval_windows
from lmforge.data.shards import load_meta
from lmforge.errors import ConfigError
from lmforge.eval.mode import eval_mode
from lmforge.models.decoder import token_loss_sum
from lmforge.train.precision import autocast


def stream_loss_sum(
    model: nn.Module,
    tokens: np.ndarray,
    context: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Summed next-token loss (nats) and predicted-token count over the whole ``tokens`` stream.

    The stream is walked in consecutive windows (``data.loader.iter_eval_windows``); every token
    but the first is predicted exactly once, the first target of each window from one token of
    context, later ones from up to ``context`` tokens.
    """
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in iter_eval_windows(tokens, context, batch_size):
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = model(x)
            loss, n = token_loss_sum(logits, y)
            total += float(loss)
            count += n
    return total, count


def check_shard_tokenizer(data_dir: str | Path, tokenizer: Tokenizer, checkpoint: str) -> None:
    """``ConfigError`` unless the shards of ``data_dir`` were made with ``tokenizer``.

    Compares the folder's tokenizer file (whose bytes ``meta.json``'s sha256 identifies) with
    the checkpoint's tokenizer as ``tokenizers`` serialises them, not by file hash: a checkpoint
    may hold the same tokenizer written differently (a fine-tune's model folder pretty-prints
    it; a GGUF file has no tokenizer.json at all).
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    theirs = data_dir / meta.get("tokenizer_file", "tokenizer.json")
    if theirs.is_file():
        same = Tokenizer.from_file(str(theirs)).to_str() == tokenizer.to_str()
    else:  # a folder without its tokenizer file: the vocabulary size is all there is to check
        same = meta.get("vocab_size") in (None, tokenizer.get_vocab_size())
    if same:
        return
    raise ConfigError(
        f"data: {data_dir} was tokenized with another tokenizer than checkpoint {checkpoint} "
        f"(meta.json tokenizer_sha256 {str(meta.get('tokenizer_sha256'))[:12]}…, vocabulary "
        f"{meta.get('vocab_size')} vs the checkpoint's {tokenizer.get_vocab_size()}): its loss "
        "and bits-per-byte would be meaningless. Pass the raw text file as --data (it is "
        "tokenized with the checkpoint's tokenizer), or prepare the data with the checkpoint's "
        "tokenizer.json (data.tokenizer)."
    )


def lm_metrics(loss_sum: float, n_tokens: int, n_bytes: int | None) -> dict[str, float]:
    """``val_loss`` (nats/token), ``val_ppl`` and, when the byte count is known, ``val_bpb``."""
    loss = loss_sum / max(1, n_tokens)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    if n_bytes:
        out["val_bpb"] = loss_sum / math.log(2) / n_bytes
    return out
