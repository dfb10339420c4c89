"""Classification data: formats, label sets, errors that name file:line:column, stratified split,
imbalance and class weights, padded batches with an exact-resume cursor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.classification import (
    ClassificationBatches,
    ClassifyDataConfig,
    class_weights,
    default_paths,
    encode_labels,
    encode_texts,
    imbalance,
    label_set,
    read_examples,
    stratified_split,
    train_wordpiece,
)
from lmforge.errors import DataError

CFG = ClassifyDataConfig()


def test_csv_tsv_jsonl_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\nbad day,neg\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello, world\tpos\nbad day\tneg\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "hello, world", "label": "pos"})
        + "\n\n"
        + json.dumps({"text": "bad day", "label": "neg"})
        + "\n"
    )
    got = [
        [(e.text, e.labels) for e in read_examples(tmp_path / f"a.{x}", CFG)]
        for x in ("csv", "tsv", "jsonl")
    ]
    assert got[0] == got[1] == got[2] == [("hello, world", ("pos",)), ("bad day", ("neg",))]


def test_errors_name_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("text,label\nfine,pos\n,neg\n")
    with pytest.raises(DataError, match=rf"{f}:3: column 'text' is empty"):
        read_examples(f, CFG)
    f.write_text("sentence,label\nfine,pos\n")
    with pytest.raises(
        DataError, match=r"d.csv:2: column 'text' is missing \(columns: sentence, label\)"
    ):
        read_examples(f, CFG)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"{j}:2: not valid JSON"):
        read_examples(j, CFG)
    ok = tmp_path / "ok.csv"
    ok.write_text("text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataError, match=r"ok.csv:4: label 'z' is not in data.labels"):
        label_set(read_examples(ok, CFG), ["x", "y"])


def test_text_pairs_and_multilabel(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text(
        "premise,hypothesis,tags\nA man sleeps.,A person rests.,entail|easy\nIt rains.,It is dry.,contra\n"
    )
    cfg = ClassifyDataConfig(
        text_column="premise", text_pair_column="hypothesis", label_column="tags", multi_label=True
    )
    ex = read_examples(f, cfg)
    assert ex[0].text_pair == "A person rests." and ex[0].labels == ("entail", "easy")
    labels = label_set(ex, None)
    y = encode_labels(ex, labels, multi_label=True)
    assert labels == ["contra", "easy", "entail"] and y.tolist() == [[0, 1, 1], [1, 0, 0]]
    tok = train_wordpiece([e.text + " " + e.text_pair for e in ex] * 5, vocab_size=80)
    ids, types = encode_texts(tok, ex, max_length=32)[0]
    assert ids[0] == tok.token_to_id("[CLS]") and types[0] == 0 and types[-1] == 1  # segment B


def test_stratified_split_keeps_class_shares() -> None:
    ex = read_examples(default_paths()["train"], CFG)
    labels = label_set(ex, None)
    y = encode_labels(ex, labels, False)
    tr, va = stratified_split(ex, y, 0.2, seed=0)
    assert sorted(tr + va) == list(range(len(ex))) and not set(tr) & set(va)
    share = lambda idx: np.bincount(y[idx], minlength=len(labels)) / len(idx)
    np.testing.assert_allclose(share(va), share(tr), atol=0.01)


def test_imbalance_report_and_balanced_weights() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    rep = imbalance(y, ["a", "b", "c"])
    assert rep["counts"] == {"a": 6, "b": 2, "c": 1} and rep["max_min_ratio"] == 6.0
    from sklearn.utils.class_weight import compute_class_weight

    want = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(class_weights(y, 3).numpy(), want, rtol=1e-6)


def test_batches_pad_and_resume_exactly() -> None:
    rows = [([2] + [7] * n + [3], [0] * (n + 2)) for n in range(1, 11)]
    y = np.arange(10)
    a = ClassificationBatches(rows, y, batch_size=3, seed=0, pad_id=0)
    for _ in range(4):  # into the second epoch
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    b = ClassificationBatches(rows, y, batch_size=3, seed=0, pad_id=0)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(want, [b.next_batch() for _ in range(3)], strict=True):
        assert all((xa[k] == xb[k]).all() for k in xa) and (ya == yb).all()
    x, yy = want[0]
    lengths = x["attention_mask"].sum(1)
    assert x["idx"].shape[1] == int(lengths.max())  # padded to the longest row only
    assert ((x["idx"] == 0) == (x["attention_mask"] == 0)).all()
