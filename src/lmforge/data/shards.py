"""Token shards: split documents into train/val, tokenize in parallel, write flat memmaps.

A prepared data folder holds ``train.bin`` and ``val.bin`` — every document's token ids
followed by the EOS id, concatenated, as raw little-endian ``uint16`` (``uint32`` when the
vocabulary has more than 65,535 entries) — plus ``tokenizer.json`` and ``meta.json``, the
manifest later stages read (dtype, counts, tokenizer hash). ``meta.json`` is written last and
atomically, so a folder with one is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmforge.atomic import atomic_write_text
from lmforge.data.tokenizer import chunkable, eos_id, safe_pieces
from lmforge.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Characters per worker task: big enough to amortise inter-process traffic, small enough to
# spread one long document over the workers.
PIECE_CHARS = 1 << 18
# Below this much text per process, spawning it costs more than it saves.
CHARS_PER_WORKER = 2_000_000


def shard_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` up to a vocabulary of 65,535, ``uint32`` above (the DESIGN.md contract).

    A vocabulary of exactly 65,536 would still fit 16 bits; one rule everywhere is worth more.
    """
    return np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)


# ------------------------------------------------------------------------------------ split


def split_documents(
    docs: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str], str]:
    """Split cleaned, deduplicated documents into (train, val, method) without leakage.

    Several documents: a seeded shuffle picks ``round(val_fraction * n)`` whole documents (at
    least one) for val; both splits keep the corpus order. Dedup ran first, so a duplicate
    cannot sit on both sides. One document (e.g. tinyshakespeare): contiguous, as nanoGPT — the
    last ``val_fraction`` of the characters is val, the cut moved forward to the start of the
    next line (or kept at the exact character if no newline follows).
    """
    if not docs:
        raise DataError(
            "no documents left after cleaning and deduplication; check data.path and the filters"
        )
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        newline = text.find("\n", max(cut - 1, 0))  # cut already at a line start: stay
        cut = newline + 1 if newline >= 0 else cut
        if cut <= 0 or cut >= len(text):
            raise DataError(
                f"the single document ({len(text)} chars) is too short to split into train and "
                "val; use more text or a larger data.val_fraction"
            )
        return [text[:cut]], [text[cut:]], "contiguous"
    n_val = max(1, round(len(docs) * val_fraction))
    in_val = np.zeros(len(docs), dtype=bool)
    in_val[np.random.default_rng(seed).permutation(len(docs))[:n_val]] = True
    train = [d for d, v in zip(docs, in_val, strict=True) if not v]
    val = [d for d, v in zip(docs, in_val, strict=True) if v]
    return train, val, "by_document"


# --------------------------------------------------------------------------------- tokenize


Task = list[tuple[str, bool]]  # (piece of text, piece ends a document)


def _tasks(texts: Sequence[str], piece_chars: int, cut: bool) -> list[Task]:
    """Group the pieces of ``texts`` into tasks of about ``piece_chars`` characters."""
    tasks: list[Task] = []
    task: Task = []
    size = 0
    for text in texts:
        pieces = safe_pieces(text, piece_chars) if cut else [text]
        for i, piece in enumerate(pieces):
            task.append((piece, i == len(pieces) - 1))
            size += len(piece)
            if size >= piece_chars:
                tasks.append(task)
                task, size = [], 0
    if task:
        tasks.append(task)
    return tasks


def plan_workers(num_workers: int, n_tasks: int, n_chars: int, chars_per_worker: int) -> int:
    """Processes worth starting: one costs ~0.5-1 s to spawn (importing numpy and tokenizers),
    about what encoding 1M characters takes, so each should get ``chars_per_worker``."""
    return max(1, min(num_workers, n_tasks, n_chars // max(chars_per_worker, 1)))


_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    # One Rust thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = _data_tokenizer(tokenizer_json)


def _data_tokenizer(tokenizer_json: str) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer_json)
    # Corpus text is text: a literal "<|eos|>" in it must be encoded as characters, not turn
    # into a document boundary. (A runtime flag; it is not saved in tokenizer.json.)
    tok.encode_special_tokens = True
    return tok


def _encode_task(task: Task, tok: Tokenizer | None = None) -> np.ndarray:
    """Token ids of one task, EOS after each piece that ends a document; (n,) uint32."""
    if tok is None:
        tok = _worker_tok
    assert tok is not None, "worker not initialised"
    eos = eos_id(tok)
    encodings = tok.encode_batch_fast([piece for piece, _ in task], add_special_tokens=False)
    out: list[int] = []
    for (_, ends_doc), enc in zip(task, encodings, strict=True):
        out.extend(enc.ids)
        if ends_doc:
            out.append(eos)
    return np.asarray(out, dtype=np.uint32)


@contextlib.contextmanager
def _encoder(
    tok: Tokenizer, workers: int
) -> Iterator[Callable[[list[Task]], Iterator[np.ndarray]]]:
    """A function mapping tasks to their token arrays, in order, using ``workers`` processes."""
    tokenizer_json = tok.to_str()
    if workers <= 1:
        local = _data_tokenizer(tokenizer_json)
        yield lambda tasks: (_encode_task(task, local) for task in tasks)
        return
    # spawn, not fork: the parent may hold torch or tokenizers threads, and forking a
    # multi-threaded process can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        yield lambda tasks: pool.imap(_encode_task, tasks)  # imap keeps task order


def encode_documents(
    texts: Sequence[str],
    tok: Tokenizer,
    num_workers: int,
    piece_chars: int = PIECE_CHARS,
    chars_per_worker: int = CHARS_PER_WORKER,
) -> np.ndarray:
    """The token stream of ``texts``, each document followed by EOS; shape (n_tokens,) uint32.

    Worker processes encode the parts when ``plan_workers`` finds it worthwhile; the output
    is identical to the in-process path (tested). Long documents are cut only at safe points,
    and only for tokenizers where such cuts are token-neutral (``chunkable``).
    """
    tasks = _tasks(texts, piece_chars, cut=chunkable(tok))
    n_chars = sum(map(len, texts))
    with _encoder(tok, plan_workers(num_workers, len(tasks), n_chars, chars_per_worker)) as enc:
        return np.concatenate([np.zeros(0, np.uint32), *enc(tasks)])


def write_shards(
    out_dir: Path,
    splits: dict[str, Sequence[str]],
    tok: Tokenizer,
    num_workers: int,
    piece_chars: int = PIECE_CHARS,
    chars_per_worker: int = CHARS_PER_WORKER,
) -> tuple[dict[str, int], int]:
    """Tokenize each split into ``out_dir/<split>.bin``; return (tokens per split, workers used).

    One worker pool serves all splits. Each shard is written under a temporary name and
    renamed, so a crash never leaves a truncated shard that looks complete.
    """
    dtype = shard_dtype(tok.get_vocab_size()).newbyteorder("<")
    eos_id(tok)  # fail here, not in a worker, if a reused tokenizer has no end-of-text token
    cut = chunkable(tok)
    tasks = {name: _tasks(texts, piece_chars, cut) for name, texts in splits.items()}
    n_tasks = sum(map(len, tasks.values()))
    n_chars = sum(len(t) for texts in splits.values() for t in texts)
    workers = plan_workers(num_workers, n_tasks, n_chars, chars_per_worker)
    log.debug("tokenizing %d chars in %d tasks with %d process(es)", n_chars, n_tasks, workers)
    counts = {}
    with _encoder(tok, workers) as encode:
        for name, split_tasks in tasks.items():
            path = Path(out_dir) / f"{name}.bin"
            tmp = path.with_name(f".{path.name}.tmp")
            counts[name] = 0
            try:
                with open(tmp, "wb") as f:
                    for ids in encode(split_tasks):
                        f.write(ids.astype(dtype).tobytes())
                        counts[name] += len(ids)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return counts, workers


# ------------------------------------------------------------------------------ manifest


def write_meta(data_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(
        Path(data_dir) / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    )


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared data folder; ``DataError`` if missing or unreadable."""
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; is {data_dir} a prepared data folder?") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run data preparation") from None


def open_shard(data_dir: str | Path, split: str) -> np.ndarray:
    """The ``split`` token stream of a prepared folder as a read-only memmap, shape (n_tokens,).

    The size is checked against ``meta.json``, so a shard from another preparation is caught.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / meta.get(f"{split}_file", f"{split}.bin")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta[f"{split}_tokens"]
    if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
        raise DataError(
            f"{path}: missing or not {expected} {meta['dtype']} tokens as meta.json says"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(expected,))
