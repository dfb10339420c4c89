"""Chat templates: conversations → the text and token ids a chat model was trained on.

ChatFormat   the checkpoint's own Jinja chat template (sandboxed, as transformers renders it)
             or ChatML, bound to a tokenizer: renders and encodes conversations, marks the
             assistant tokens (the SFT loss mask), gives the prompt ids of the next turn and
             the ids generation stops at. Used by SFT (``data/sft.py``), chat, generate, merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.tokenizer import EOS_ALIASES, eos_id, special_tokens
from lmforge.errors import DataError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}

# ChatML (OpenAI; Qwen, SmolLM2 use it). END is replaced by the end-of-turn token.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + 'END' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _jinja_env():
    """Jinja2 as transformers renders chat templates: sandboxed, immutable, trimmed blocks."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env


@dataclass
class ChatFormat:
    """A chat template bound to a tokenizer. ``end_of_turn`` is the id generation stops at."""

    tokenizer: Tokenizer
    template: str
    end_of_turn: int
    bos_token: str = ""
    eos_token: str = ""
    source: str = "ChatML"

    def __post_init__(self) -> None:
        self._compiled = _jinja_env().from_string(self.template)

    @classmethod
    def chatml(cls, tokenizer: Tokenizer) -> ChatFormat:
        """ChatML. A tokenizer without ``<|im_end|>`` (lmforge's own BPE) ends turns with its EOS
        token instead, so the end of a turn is one token; ``<|im_start|>`` is then plain text."""
        end = tokenizer.token_to_id("<|im_end|>")
        end_tok = "<|im_end|>" if end is not None else tokenizer.id_to_token(eos_id(tokenizer))
        return cls(tokenizer, CHATML.replace("END", end_tok), tokenizer.token_to_id(end_tok))

    @classmethod
    def for_checkpoint(cls, path: str | Path, tokenizer: Tokenizer) -> ChatFormat:
        """The checkpoint's own template (tokenizer_config.json, chat_template.jinja or GGUF
        metadata), else ChatML."""
        path = Path(path)
        template, eos_tok, bos_tok, source = None, None, None, "ChatML"
        if path.suffix == ".gguf" and path.is_file():
            from gguf import GGUFReader

            fields = GGUFReader(str(path)).fields
            if "tokenizer.chat_template" in fields:
                template, source = fields["tokenizer.chat_template"].contents(), f"{path} (GGUF)"
            if "tokenizer.ggml.eos_token_id" in fields:
                eos_tok = tokenizer.id_to_token(
                    int(fields["tokenizer.ggml.eos_token_id"].contents())
                )
        elif path.is_dir():
            cfg_path = path / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if (path / "chat_template.jinja").is_file():
                template, source = (
                    (path / "chat_template.jinja").read_text(),
                    str(path / "chat_template.jinja"),
                )
            elif isinstance(cfg.get("chat_template"), str):
                template, source = cfg["chat_template"], str(cfg_path)
            tok = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
            eos_tok, bos_tok = tok(cfg.get("eos_token")), tok(cfg.get("bos_token"))
        # Tokens the template renders as bos_token/eos_token: those the tokenizer declares
        # (special_tokens) unless the checkpoint's tokenizer_config.json names them.
        special = special_tokens(tokenizer)
        name = lambda i: tokenizer.id_to_token(i) if i is not None else None  # noqa: E731
        eos_tok, bos_tok = eos_tok or name(special.eos), bos_tok or name(special.bos)
        if template is None:
            return cls.chatml(tokenizer)
        # The end of an assistant turn: ChatML's marker if the template uses it, else the EOS.
        end_tok = "<|im_end|>" if "<|im_end|>" in template else eos_tok
        end = tokenizer.token_to_id(end_tok) if end_tok else None
        if end is None:
            end = eos_id(tokenizer)
        return cls(tokenizer, template, end, bos_tok or "", eos_tok or "", source)

    def stop_ids(self, path: str | Path | None = None) -> set[int]:
        """Ids generation stops at: the end of an assistant turn, the end of text, and the
        ``eos_token_id`` list of the checkpoint's ``generation_config.json`` (Llama 3 lists two)."""
        ids = {self.end_of_turn}
        if (eos := special_tokens(self.tokenizer).eos) is not None:
            ids.add(eos)
        for name in (self.eos_token, *EOS_ALIASES, "<|eot_id|>"):
            found = self.tokenizer.token_to_id(name) if name else None
            if found is not None:
                ids.add(found)
        gen = Path(path) / "generation_config.json" if path is not None else None
        if gen is not None and gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
        return ids

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode(
        self, messages: list[Message], train_on_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained): int32 (n,) token ids and bool (n,) True where the loss counts.

        The rendered text is cut at assistant-turn edges (found by rendering each prefix with
        and without the generation prompt) and each piece is encoded alone, so a prompt
        encodes exactly as ``prompt_ids`` encodes it at inference time.
        """
        full = self.render(messages)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            end = len(self.render(messages[: i + 1]))
            if not (full[:start] == self.render(messages[:i], True) and start >= done):
                raise DataError(
                    f"chat template ({self.source}) does not render conversations as growing "
                    "prefixes, so assistant tokens cannot be located; use a ChatML-like template"
                )
            pieces += [(full[done:start], train_on_prompt), (full[start:end], True)]
            done = end
        pieces.append((full[done:], train_on_prompt))
        ids, trained = [], []
        for text, train in pieces:
            piece = self._encode(text)
            ids += piece
            trained += [train] * len(piece)
        return np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids to generate the next assistant turn from (history + generation prompt)."""
        history = [*messages, {"role": "assistant", "content": "x"}]
        ids, trained = self.encode(history)
        return [int(t) for t in ids[: _last_prompt_end(trained)]]


def _last_prompt_end(trained: np.ndarray) -> int:
    """Index where the last run of trained tokens starts (the end of the final prompt)."""
    i = len(trained)
    while i > 0 and not trained[i - 1]:
        i -= 1
    while i > 0 and trained[i - 1]:
        i -= 1
    return i
