"""The checks that stop a bad export: what users of exported models were burnt by.

An export that loads but generates forever (no EOS, or a chat template whose end of turn is not
a token the runtime stops at), an adapter that was silently lost, an output head that came
untied, weights scrambled by a layout mistake — each is a ``Check`` here. The export recipe runs
them on the source before writing and on the written files read back by their consumer
(onnxruntime, lmforge's GGUF and Hugging Face readers) after; a failed check stops the export
with a message naming it, unless ``--force``. Every result lands in ``export_report.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer

from lmforge.data.chat_template import ChatFormat
from lmforge.data.tokenizer import special_tokens
from lmforge.eval.mode import eval_mode
from lmforge.generate import generate_tokens
from lmforge.models.decoder import Decoder

# A fixed prompt and continuation length for the greedy-parity check: long enough that a
# layout mistake (a wrong RoPE permutation, a transposed matrix) changes some token.
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
N_TOKENS = 16
CONVERSATION = [
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello."},
]


@dataclass(frozen=True)
class Check:
    """One check's outcome; ``detail`` says what was measured or what is wrong and what to do."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def special_token_checks(tokenizer: Tokenizer, vocab_size: int) -> list[Check]:
    """EOS must exist (else consumers generate to their length limit); every declared BOS/EOS/PAD
    id must be a row of the model and a token of the tokenizer."""
    found = vars(special_tokens(tokenizer))
    checks = []
    for role, i in found.items():
        if i is None:
            fatal = role == "eos"
            what = {"eos": "no end-of-text token: runtimes would generate until their length "
                    "limit; add one (e.g. <|eos|>) to the tokenizer and fine-tune with it",
                    "bos": "none (lmforge prompts carry no BOS; add_bos_token is written false)",
                    "pad": "none (batched consumers pad with EOS)"}[role]  # fmt: skip
            checks.append(Check(f"{role}_token", not fatal, what))
        elif not 0 <= i < vocab_size or tokenizer.id_to_token(i) is None:
            checks.append(Check(f"{role}_token", False, f"id {i} is outside the model's "
                                f"{vocab_size} rows or the tokenizer"))  # fmt: skip
        else:
            checks.append(Check(f"{role}_token", True, f"id {i} {tokenizer.id_to_token(i)!r}"))
    return checks


def chat_template_check(fmt: ChatFormat) -> Check:
    """The template renders a conversation, and its end of turn is one token that generation
    stops at (else a chat runtime would run on into an invented next turn)."""
    try:
        text = fmt.render(CONVERSATION)
    except Exception as e:  # a template error is the user's to fix, whatever jinja raises
        return Check("chat_template", False, f"{fmt.source}: does not render ({e})")
    end = fmt.tokenizer.id_to_token(fmt.end_of_turn)
    if end is None or end not in text:
        return Check("chat_template", False, f"{fmt.source}: the rendered turn does not end with "
                     f"the end-of-turn token {end!r}")  # fmt: skip
    ids = fmt.tokenizer.encode(end, add_special_tokens=False).ids
    if ids != [fmt.end_of_turn]:
        return Check("chat_template", False, f"{fmt.source}: end-of-turn {end!r} encodes to "
                     f"{ids}, not the one token {fmt.end_of_turn}; mark it special in the "
                     "tokenizer")  # fmt: skip
    if fmt.end_of_turn not in fmt.stop_ids():
        return Check("chat_template", False, f"end-of-turn {end!r} is not a stop token")
    return Check(
        "chat_template", True, f"{fmt.source}; turns end with {end!r} (id {fmt.end_of_turn})"
    )


def adapter_check(before: dict[str, torch.Tensor], merged: Decoder) -> Check:
    """The merged weights differ from the base's: an adapter whose B is still zero (never
    trained) or that landed on no module changes nothing, and the export would silently be the
    base model."""
    after = merged.state_dict()
    changed = [n for n, w in before.items() if not torch.equal(w, after[n])]
    if not changed:
        return Check("adapter_merged", False, "merging the adapter changed no weight: it is "
                     "untrained (B = 0) or targets no module of this base")  # fmt: skip
    delta = max((after[n] - before[n]).abs().max().item() for n in changed)
    return Check("adapter_merged", True, f"{len(changed)} tensors changed, max |Δw| {delta:.3g}")


def tied_check(source: Decoder, exported: Decoder) -> Check:
    """A tied output head stays tied (one matrix, not a copy that drifts or a missing head)."""
    tied = source.cfg.tie_embeddings
    same = exported.lm_head.weight is exported.tok_emb.weight
    if tied != exported.cfg.tie_embeddings or tied != same:
        return Check("tied_embeddings", False, f"source tie_embeddings={tied}, the export reads "
                     f"back as tie_embeddings={exported.cfg.tie_embeddings} (shared: {same})")  # fmt: skip
    return Check("tied_embeddings", True, f"tie_embeddings={tied} survives")


def prompt_ids(tokenizer: Tokenizer, context_length: int) -> list[int]:
    """The fixed prompt's ids, cut (from the front) so that it and the ``N_TOKENS`` greedy
    tokens fit the model's context."""
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    return ids[-max(1, context_length - N_TOKENS) :]


def source_greedy(model: Decoder, ids: Sequence[int]) -> list[int]:
    """The source model's greedy continuation of ``ids`` (no stop token: always N_TOKENS)."""
    with eval_mode(model, inference=True):
        return list(generate_tokens(model, ids, max_new_tokens=N_TOKENS, temperature=0))


def greedy_check(source: list[int], exported: list[int], lossless: bool, what: str) -> Check:
    """Greedy continuations agree. Required for lossless exports (fp32); a rounded or quantized
    export (f16, q8_0, q4_0) reports how many tokens agree before the first difference."""
    agree = next((i for i, (a, b) in enumerate(zip(source, exported, strict=False)) if a != b),
                 min(len(source), len(exported)))  # fmt: skip
    detail = f"{what}: {agree}/{len(source)} greedy tokens equal the source's"
    if source == exported:
        return Check("greedy_parity", True, detail)
    if lossless:
        return Check("greedy_parity", False, f"{detail}; source {source}, export {exported}")
    return Check("greedy_parity", True, detail + " (lossy type: reported, not required)")


def logit_check(diff: float, atol: float, what: str) -> Check:
    return Check("logit_parity", diff <= atol, f"{what}: max |logit diff| {diff:.3g} (≤ {atol:g})")


def metadata_check(name: str, expected: object, found: object, where: str) -> Check:
    """A value the written files declare equals the source's (special ids, chat template)."""
    if expected == found:
        return Check(name, True, f"{where} holds it")
    return Check(name, False, f"{where}: found {found!r}, expected {expected!r}")


def failed(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def describe_failures(checks: Sequence[Check], what: str, then: Callable[[], str]) -> str:
    """One paragraph naming every failed check and what to do."""
    lines = "; ".join(f"{c.name}: {c.detail}" for c in failed(checks))
    return f"{what} failed {len(failed(checks))} check(s): {lines}. {then()}"
