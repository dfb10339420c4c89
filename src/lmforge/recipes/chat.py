"""``lmforge chat --checkpoint DIR``: turn-by-turn chat with the checkpoint's own template.

Each line read from stdin is a user turn; the reply streams to stdout and joins the history
(the oldest tokens are dropped when the history outgrows the context). ``/reset`` forgets the
history, ``/exit`` (or end of input) quits. Works with piped stdin, one reply per input line.
A fine-tune run folder is accepted: its merged ``model/`` is used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from pydantic import Field

from lmforge.checkpoint.load import load
from lmforge.config import Section
from lmforge.data.chat_template import ChatFormat, Message
from lmforge.errors import ConfigError, DataError
from lmforge.generate import SampleConfig, stream_text
from lmforge.train.device import resolve_device


class ChatConfig(Section):
    checkpoint: str = Field(
        description="checkpoint, fine-tune run folder (its model/), Hugging Face folder or .gguf"
    )
    system: str | None = Field(None, description="system message at the start of the chat")
    max_new_tokens: int = Field(256, gt=0, description="tokens per reply at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(50, gt=0, description="keep the k likeliest tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus mass; null = off")
    seed: int = Field(1337, description="sampling seed")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")


def chat(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the chat loop until /exit or end of input; returns the number of replies.

    ``stdin``/``stdout`` default to the process's own (read at call time: ``lmforge chat <&-``
    runs with no standard input at all, which is a usage error, not an AttributeError)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if stdin is None or stdin.closed:
        raise ConfigError(
            "chat reads each user turn from standard input, and this process has none (was it "
            "closed with <&-?): run it in a terminal or pipe the turns in, one per line"
        )
    path = Path(cfg.checkpoint)
    if (path / "model" / "model.safetensors").is_file():  # a fine-tune run folder
        path = path / "model"
    device = resolve_device(cfg.device)
    model, tokenizer, manifest = load(path, device, expect="decoder")
    ckpt = manifest.path
    fmt = ChatFormat.for_checkpoint(ckpt, tokenizer)
    interactive = stdin.isatty()
    sample = SampleConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    history: list[Message] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    replies = line_no = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line_no += 1
        line = _read_line(stdin, line_no)
        if not line or line.strip() == "/exit":
            return replies
        text = line.rstrip("\r\n")  # bytes are read as sent: a CRLF pipe keeps its \r
        if text.strip() == "/reset":
            history = history[:1] if cfg.system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = fmt.prompt_ids(history)
        ids = ids[-max(1, model.cfg.context_length - cfg.max_new_tokens) :]
        if interactive:
            stdout.write("assistant> ")

        def show(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        reply = stream_text(model, tokenizer, ids, sample, fmt.end_of_turn, on_text=show)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
        replies += 1


def _read_line(stdin: TextIO, line_no: int) -> str:
    """One line of user input. Bytes that are not UTF-8 are a DataError naming the line: the
    line is decoded here from the byte stream when there is one (a text stream would fail on a
    whole buffered chunk, or under a C locale pass surrogates the tokenizer rejects with a bare
    TypeError)."""
    raw = getattr(stdin, "buffer", None)
    try:
        line = raw.readline().decode("utf-8") if raw is not None else stdin.readline()
        line.encode("utf-8")
    except UnicodeError:
        raise DataError(
            f"<stdin>:{line_no}: the input is not valid UTF-8 text; convert it first (e.g. "
            "iconv -f LATIN1 -t UTF-8)"
        ) from None
    return line
