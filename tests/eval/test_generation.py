"""Generation-based evaluation: batched scoring gives exactly the answers of one prompt at a
time (the old path), scores them with the given match, and per family; prompt-file evaluation
predicts what ``generate_text`` prints; the retained metric's sign."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.data.chat_template import ChatFormat
from lmforge.data.tokenizer import bos_id, eos_id, train_tokenizer
from lmforge.eval.generation import QA, evaluate_generation, exact_match_eval
from lmforge.eval.metrics import final_number_match
from lmforge.eval.retained import forgetting
from lmforge.generate import SampleConfig, generate_text, generate_tokens
from lmforge.models.decoder import Decoder, DecoderConfig

TEXT = "add 1 2 = 3. sort 3 1 2 = 1 2 3. reverse a b c = c b a. 9 8 7 6 5 4 x y z " * 40


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fmt() -> ChatFormat:
    return ChatFormat.chatml(train_tokenizer([TEXT], vocab_size=300))


def tiny(vocab: int, arch: str = "llama") -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(arch=arch, vocab_size=vocab, context_length=96, n_layer=2, n_head=2,
                        d_model=32, init="xavier")  # fmt: skip
    return Decoder(cfg).train()  # scoring must switch to eval mode and back


QUESTIONS = ["add 1 2", "sort 3 1 2 9 8 7 6", "x", "reverse a b c = c b a. 9 8 7 6", "z y"]


def one_at_a_time(model: Decoder, fmt: ChatFormat, pairs: list[QA], n: int) -> list[str]:
    """The scorer before batching: generate_tokens per prompt (its code, verbatim in effect)."""
    preds = []
    for qa in pairs:
        ids = fmt.prompt_ids(qa.history)[-(model.cfg.context_length - n) :]
        new = generate_tokens(model, ids, max_new_tokens=n, temperature=0.0, eos_id=fmt.stop_ids())
        preds.append(fmt.tokenizer.decode(list(new), skip_special_tokens=True))
    return preds


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_exact_match_eval_equals_one_prompt_at_a_time(fmt: ChatFormat, arch: str) -> None:
    model = tiny(fmt.tokenizer.get_vocab_size(), arch)
    pairs = [
        QA([{"role": "user", "content": q}], "?", f"f{i % 2}") for i, q in enumerate(QUESTIONS)
    ]
    expected = one_at_a_time(model, fmt, pairs, 12)
    assert len(set(expected)) > 1  # the prompts lead to different answers
    # the answers of rows 0 and 3 are what the model says: exact match 2/5, f0 (0, 2, 4) 1/3
    pairs = [QA(qa.history, expected[i] if i in (0, 3) else "?", qa.family)
             for i, qa in enumerate(pairs)]  # fmt: skip
    for batch_size in (1, 2, 8):
        metrics, preds = exact_match_eval(model, fmt, pairs, 12, batch_size=batch_size)
        assert preds == expected
        assert metrics == {"exact_match": 0.4, "em/f0": pytest.approx(1 / 3), "em/f1": 0.5}
    assert model.training


def test_exact_match_eval_uses_the_match_function(fmt: ChatFormat) -> None:
    model = tiny(fmt.tokenizer.get_vocab_size())
    pairs = [QA([{"role": "user", "content": "add 1 2"}], "#### 3")]
    metrics, (pred,) = exact_match_eval(model, fmt, pairs, 6, match=lambda p, a: True)
    assert metrics["exact_match"] == 1.0
    metrics, _ = exact_match_eval(model, fmt, pairs, 6, match=final_number_match)
    assert metrics["exact_match"] == float(final_number_match(pred, "#### 3"))


def test_prompt_file_predictions_are_generate_texts(fmt: ChatFormat, tmp_path: Path) -> None:
    tok = fmt.tokenizer
    model = tiny(tok.get_vocab_size(), "gpt2")
    prompts = ["add 1", "sort 3 1 2 9 8 7", "", "x y z x"]  # "" starts from BOS
    sample = SampleConfig(max_new_tokens=10, temperature=0.0, top_k=None)
    said = [
        generate_text(model, tok, p, sample, bos_id=bos_id(tok), eos_id=eos_id(tok)).strip()
        for p in prompts
    ]
    data = tmp_path / "prompts.jsonl"
    refs = [said[0], "nope", said[2], "nope"]
    data.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n"
                            for p, r in zip(prompts, refs, strict=True)))  # fmt: skip
    metrics = evaluate_generation(model, tok, data, tmp_path / "eval", 10, batch_size=3)
    assert metrics["exact_match"] == pytest.approx(0.5) and metrics["n"] == 4
    assert (tmp_path / "eval" / "report.md").is_file()
    assert model.training


def test_forgetting_is_positive_when_forgotten() -> None:
    assert forgetting({"retain_em": 0.9}, {"retain_em": 0.5})["forgetting_em"] == 0.4
    assert forgetting({"retain_bpb": 2.0}, {"retain_bpb": 2.5})["forgetting_bpb"] == 0.5
