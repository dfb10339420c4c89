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


def chat(cfg: ChatConfig, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Run the chat loop until /exit or end of input; returns the number of replies."""
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
    replies = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return replies
        text = line.rstrip("\n")
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
