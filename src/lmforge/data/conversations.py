"""Instruction records → conversations (lists of messages), every record validated.

read_conversations   Alpaca / OpenAI ``messages`` / ShareGPT / question-answer records (JSON or
                     JSONL) → messages; errors name file:line and field
to_messages          one record → messages (the format given, or decided by its keys)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.config import package_path
from lmforge.data.chat_template import Message
from lmforge.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
SHAREGPT_ROLES["assistant"] = "assistant"


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) per record of a JSONL file or a JSON array file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    out: list[tuple[int, Any]] = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        # A JSON array, decoded element by element so each record knows its line.
        dec, pos = json.JSONDecoder(), text.index("[") + 1 if "[" in text else 0
        if not text.lstrip().startswith("["):
            raise DataError(f"{path}:1: a .json file must hold an array of records")
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            out.append((line, value))
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((i, DataError(f"{path}:{i}: not valid JSON ({e.msg})")))
    return out


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{field}: empty")
    return value


def to_messages(record: Any, fmt: str = "auto") -> list[Message]:
    """One record → a list of {"role", "content"} messages; ValueError names the bad field."""
    if not isinstance(record, dict):
        raise ValueError(f"<record>: expected an object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = next(
            (
                f
                for f, key in (
                    ("messages", "messages"),
                    ("sharegpt", "conversations"),
                    ("alpaca", "instruction"),
                    ("qa", "question"),
                )
                if key in record
            ),
            "",
        )
        if not fmt:
            raise ValueError(
                "<record>: unknown format: expected keys messages (OpenAI), conversations "
                f"(ShareGPT), instruction/output (Alpaca) or question/answer; got "
                f"{sorted(record)[:6]}"
            )
    if fmt == "qa":
        return [
            {"role": "user", "content": _text(record.get("question"), "question")},
            {"role": "assistant", "content": _text(record.get("answer"), "answer")},
        ]
    if fmt == "alpaca":
        user = _text(record.get("instruction"), "instruction")
        extra = _text(record.get("input", ""), "input", allow_empty=True)
        msgs = [{"role": "user", "content": user + ("\n\n" + extra if extra.strip() else "")}]
        msgs.append({"role": "assistant", "content": _text(record.get("output"), "output")})
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(record["system"], "system")})
        return msgs
    key, role_key, content_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{key}: expected a non-empty list of turns")
    msgs = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object")
        role = turn.get(role_key)
        role = role if fmt == "messages" else SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise ValueError(f"{where}.{role_key}: {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise ValueError(f"{where}.{role_key}: a system message may only come first")
        content = _text(
            turn.get(content_key), f"{where}.{content_key}", allow_empty=role != "assistant"
        )
        msgs.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{key}: no assistant turn, so nothing to learn")
    return msgs


def read_conversations(
    path: str | Path, fmt: str = "auto", on_error: str = "fail"
) -> tuple[list[list[Message]], list[str]]:
    """All records of ``path`` as message lists, and the problems of the skipped ones.

    ``on_error="fail"`` raises DataError at the first bad record (``file:line: field: what``);
    ``"skip"`` leaves it out and returns its message.
    """
    path = package_path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT data file not found")
    convs, problems = [], []
    for line, value in _records(path):
        try:
            if isinstance(value, DataError):
                raise value
            convs.append(to_messages(value, fmt))
        except (ValueError, DataError) as e:
            msg = str(e) if isinstance(e, DataError) else f"{path}:{line}: {e}"
            if on_error == "fail":
                raise DataError(msg + " (set data.on_error=skip to skip bad records)") from None
            problems.append(msg)
    if not convs:
        raise DataError(f"{path}: no usable records ({len(problems)} bad)")
    return convs, problems
