"""Raw text in, clean unique documents out: read .txt/.jsonl, normalise, filter, deduplicate.

A *document* is one ``.txt`` file or one ``.jsonl`` record. Every problem a user can fix in
their data (bad UTF-8, malformed JSON, a missing field, no files matched) raises ``DataError``
naming the file and line, or — with ``on_error="skip"`` — is skipped and counted, so the
numbers end up in ``meta.json`` instead of silently vanishing.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import html
import json
import logging
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lmforge.errors import DataError

if TYPE_CHECKING:
    from datasketch import MinHash

log = logging.getLogger(__name__)

EXTENSIONS = (".txt", ".jsonl")
NUM_PERM = 128  # MinHash permutations: ~9% std error on a Jaccard estimate, 1 KiB per document
SHINGLE_WORDS = 5  # word n-gram size for space-separated text
SHINGLE_CHARS = 5  # character n-gram size for short or CJK text
MAX_EXAMPLES = 10  # skipped-record locations kept for meta.json

OnError = Literal["fail", "skip"]


@dataclasses.dataclass
class CleanStats:
    """Counts from reading, cleaning and deduplication (they go into ``meta.json``)."""

    files: int = 0
    ignored_files: int = 0  # files in a folder with an extension other than .txt/.jsonl
    documents_read: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> lines/records
    skipped_examples: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason"
    dropped_empty: int = 0
    dropped_short: int = 0
    dropped_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    chars_read: int = 0
    chars_kept: int = 0

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}")


# ---------------------------------------------------------------------------------- reading


def find_files(spec: str) -> tuple[list[Path], int]:
    """Input files for ``spec`` (a file, a folder searched recursively, or a glob), sorted.

    Returns (files, number of files ignored in folders for their extension). Sorting makes the
    document order, and so the split and the tokenizer, independent of the file system.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in found if p.suffix.lower() in EXTENSIONS]
        if not files:
            raise DataError(f"{spec}: folder holds no .txt or .jsonl files")
        return files, len(found) - len(files)
    if path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no file, folder or glob match (data.path)")
    for f in files:
        if f.suffix.lower() not in EXTENSIONS:
            raise DataError(f"{f}: unsupported file type '{f.suffix}'; use .txt or .jsonl")
    return files, 0


def _bad_utf8(where: str, line: bytes, start: int) -> str:
    """Message for undecodable bytes at byte offset ``start`` of ``line``."""
    return f"{where}: invalid UTF-8 (bytes {line[start : start + 4].hex(' ')} at byte {start} of the line)"


def _read_txt(path: Path, on_error: OnError, stats: CleanStats) -> Iterator[str]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM is not text
    try:
        yield data.decode("utf-8")
        return
    except UnicodeDecodeError as e:
        if on_error == "fail":
            start = data.rfind(b"\n", 0, e.start) + 1
            end = data.find(b"\n", e.start)
            line = data[start : end if end >= 0 else len(data)]
            line_no = data.count(b"\n", 0, e.start) + 1
            raise DataError(
                _bad_utf8(f"{path}:{line_no}", line, e.start - start)
                + "; fix the file or set data.on_error=skip to drop such lines"
            ) from None
    # Slow path only for broken files: decode line by line and drop the bad lines. Lines are
    # split on b"\n" alone, as in the line numbers of the error above.
    kept = []
    for i, line in enumerate(data.split(b"\n"), start=1):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            stats.skip("invalid_utf8", f"{path}:{i}")
    yield "\n".join(kept)


def _read_jsonl(path: Path, text_field: str, on_error: OnError, stats: CleanStats) -> Iterator[str]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. the trailing newline) are not records
        where = f"{path}:{i}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason, message = "invalid_utf8", _bad_utf8(where, raw, e.start)
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                reason, message = (
                    "invalid_json",
                    f"{where}: malformed JSON ({e.msg} at column {e.colno})",
                )
            else:
                value = record.get(text_field) if isinstance(record, dict) else None
                if isinstance(value, str):
                    yield value
                    continue
                if not isinstance(record, dict):
                    got = f"a JSON {type(record).__name__}, not an object"
                elif text_field not in record:
                    got = f"no field '{text_field}' (fields: {', '.join(map(str, record))})"
                else:
                    got = f"field '{text_field}' is {type(value).__name__}, not a string"
                reason, message = "missing_field", f"{where}: {got}; set data.text_field"
        if on_error == "fail":
            raise DataError(f"{message}; or set data.on_error=skip to drop such records")
        stats.skip(reason, where)


def read_documents(
    spec: str, text_field: str, on_error: OnError, stats: CleanStats
) -> Iterator[str]:
    """Yield raw documents from ``spec`` in sorted file order, counting into ``stats``."""
    files, ignored = find_files(spec)
    stats.files, stats.ignored_files = len(files), ignored
    if ignored:
        log.warning("%s: ignored %d file(s) that are not .txt or .jsonl", spec, ignored)
    for path in files:
        if path.suffix.lower() == ".txt":
            docs = _read_txt(path, on_error, stats)
        else:
            docs = _read_jsonl(path, text_field, on_error, stats)
        for doc in docs:
            stats.documents_read += 1
            stats.chars_read += len(doc)
            yield doc


# --------------------------------------------------------------------------------- cleaning

# C0/C1 control characters except \t and \n (\r is turned into \n first), plus the BOM.
# Other format characters (Cf) stay: the zero-width joiner holds emoji sequences together.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_HTML_DROP = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
# A tag must start with a letter (or /letter, !doctype), so "a < b" and "<<2*3=6>>" survive.
_HTML_BREAK = re.compile(r"<(br|/p|/div|/li|/h[1-6]|/tr)\b[^<>]*>", re.I)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(\s[^<>]*)?/?>|<![A-Za-z][^<>]*>")
# Only entities closed by ';': html.unescape alone also rewrites "&not" or "&copy" in prose.
_ENTITY = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_TRAILING = re.compile(r"[ \t]+$", re.M)
# Runs of 2+ blanks *between* words collapse; leading indentation (code, verse) is kept.
_INNER_RUN = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_BLANK_LINES = re.compile(r"\n{3,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def strip_html(text: str) -> str:
    """Remove tags, comments and script/style blocks; decode ``&amp;``-style entities."""
    text = _HTML_DROP.sub("", text)
    text = _HTML_BREAK.sub("\n", text)  # block ends become line breaks so words don't merge
    text = _HTML_TAG.sub("", text)
    # Entities last, so "&lt;b&gt;" becomes the literal text "<b>" rather than a stripped tag.
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def clean_text(text: str, normalize_unicode: bool = True, remove_html: bool = True) -> str:
    """Normalise one document: NFKC, newlines, control characters, HTML, whitespace.

    On ordinary prose this is close to a no-op: it only joins runs of blanks between words,
    drops trailing blanks, squeezes 3+ newlines to one blank line, and strips leading blank
    lines and trailing whitespace of the document (first-line indentation is kept).
    """
    if normalize_unicode:
        text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if remove_html:
        text = strip_html(text)
    text = _TRAILING.sub("", text)
    text = _INNER_RUN.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


# ------------------------------------------------------------------------------------ dedup


# Scripts written without spaces between words: kana, CJK ideographs, Hangul, CJK extensions.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\U00020000-\U0003ffff]")


def shingles(text: str) -> set[bytes]:
    """The set MinHash estimates Jaccard similarity on.

    Word 5-grams for space-separated text; character 5-grams (whitespace removed) for text
    written without spaces (CJK) or with too few words to form a handful of word 5-grams.
    """
    words = text.split()
    head = text[:2000]  # enough to tell the script
    if len(words) >= 4 * SHINGLE_WORDS and len(_CJK.findall(head)) < 0.2 * len(head):
        n, units, sep = SHINGLE_WORDS, words, " "
    else:
        n, units, sep = SHINGLE_CHARS, list("".join(words)), ""
    if len(units) <= n:
        return {sep.join(units).encode("utf-8")}
    return {sep.join(units[i : i + n]).encode("utf-8") for i in range(len(units) - n + 1)}


def near_duplicate_filter(docs: list[str], threshold: float, seed: int) -> list[bool]:
    """``keep[i]`` is False when doc i is a near duplicate of an earlier kept document.

    MinHash LSH proposes candidates; each is confirmed with the MinHash Jaccard estimate, so
    LSH's banding false positives don't drop documents below ``threshold``.
    """
    # Imported here: datasketch pulls in scipy (~0.5 s), which tokenizer worker processes
    # (they import this module for DataError) and `lmforge --help` should not pay for.
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept_hashes: dict[int, MinHash] = {}
    keep = []
    # generator() shares one set of seeded permutations across documents instead of drawing
    # them again for every MinHash (which costs more than hashing a short document).
    shingle_sets = (list(shingles(doc)) for doc in docs)
    for i, m in enumerate(MinHash.generator(shingle_sets, num_perm=NUM_PERM, seed=seed)):
        dup = any(m.jaccard(kept_hashes[j]) >= threshold for j in lsh.query(m))
        if not dup:
            lsh.insert(i, m)
            kept_hashes[i] = m
        keep.append(not dup)
    return keep


def clean_corpus(
    spec: str,
    *,
    text_field: str = "text",
    on_error: OnError = "fail",
    normalize_unicode: bool = True,
    remove_html: bool = True,
    min_chars: int = 0,
    max_chars: int | None = None,
    dedup: bool = True,
    near_dedup: bool = True,
    near_dedup_threshold: float = 0.85,
    seed: int = 0,
) -> tuple[list[str], CleanStats]:
    """Read, clean, length-filter and deduplicate ``spec``; return kept documents in order.

    Exact duplicates are found on the cleaned text (so whitespace or entity variants count as
    duplicates); the first occurrence is kept.
    """
    stats = CleanStats()
    docs: list[str] = []
    seen: set[bytes] = set()
    for raw in read_documents(spec, text_field, on_error, stats):
        text = clean_text(raw, normalize_unicode, remove_html)
        if not text:
            stats.dropped_empty += 1
        elif len(text) < min_chars:
            stats.dropped_short += 1
        elif max_chars is not None and len(text) > max_chars:
            stats.dropped_long += 1
        else:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if dedup and digest in seen:
                stats.exact_duplicates += 1
                continue
            seen.add(digest)
            docs.append(text)
    if near_dedup and len(docs) > 1:
        keep = near_duplicate_filter(docs, near_dedup_threshold, seed)
        stats.near_duplicates = keep.count(False)
        docs = [d for d, k in zip(docs, keep, strict=True) if k]
    stats.kept = len(docs)
    stats.chars_kept = sum(map(len, docs))
    return docs, stats
