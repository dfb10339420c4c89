"""Reading (errors name file and line), cleaning, and exact / near deduplication."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge.data.clean import CleanStats, clean_corpus, clean_text, read_documents
from lmforge.errors import DataError

from .conftest import make_words


def read(spec, text_field="text", on_error="fail"):
    stats = CleanStats()
    return list(read_documents(str(spec), text_field, on_error, stats)), stats


# ------------------------------------------------------------------------------ reading


def test_txt_bad_utf8_fails_naming_file_and_line(write):
    path = write("bad.txt", b"fine line\nbroken \xff\xfe line\nfine again\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8 \(bytes ff fe .*at byte 7"):
        read(path)


def test_txt_bad_utf8_skip_drops_and_counts_lines(write):
    path = write("bad.txt", b"one\ntwo \xc3\x28\nthree\n\xff\n")
    docs, stats = read(path, on_error="skip")
    assert docs == ["one\nthree\n"]
    assert stats.skipped == {"invalid_utf8": 2}
    assert stats.skipped_examples == [f"{path}:2: invalid_utf8", f"{path}:4: invalid_utf8"]


def test_txt_is_one_document_and_bom_is_dropped(write):
    path = write("a.txt", b"\xef\xbb\xbfline 1\nline 2\n")
    docs, stats = read(path)
    assert docs == ["line 1\nline 2\n"]
    assert (stats.files, stats.documents_read) == (1, 1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": "unterminated', r"x\.jsonl:2: malformed JSON"),
        (
            b'{"body": "no text"}',
            r"x\.jsonl:2: no field 'text' \(fields: body\); set data.text_field",
        ),
        (b'{"text": 42}', r"x\.jsonl:2: field 'text' is int, not a string"),
        (b'["text"]', r"x\.jsonl:2: a JSON list, not an object"),
        (b'{"text": "caf\xe9"}', r"x\.jsonl:2: invalid UTF-8 \(bytes e9"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(write, line, message):
    path = write("x.jsonl", b'{"text": "ok"}\n' + line + b'\n{"text": "ok too"}\n')
    with pytest.raises(DataError, match=message):
        read(path)


def test_jsonl_skip_policy_counts_each_reason(write):
    lines = [
        b'{"text": "good one"}',
        b"",  # blank lines are not records and not errors
        b'{"text": broken}',
        b'{"title": "no text"}',
        b'{"text": "bad \xff byte"}',
        b'{"text": "good two", "extra": 1}',
    ]
    path = write("x.jsonl", b"\n".join(lines) + b"\n")
    docs, stats = read(path, on_error="skip")
    assert docs == ["good one", "good two"]
    assert stats.skipped == {"invalid_json": 1, "missing_field": 1, "invalid_utf8": 1}
    assert stats.skipped_examples[0] == f"{path}:3: invalid_json"


def test_jsonl_text_field(write):
    path = write("q.jsonl", json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert read(path, text_field="question")[0] == ["2+2?"]


def test_folder_is_recursive_sorted_and_skips_other_extensions(write, tmp_path):
    write("corpus/b/2.txt", "second")
    write("corpus/a/1.jsonl", '{"text": "first"}\n{"text": "first b"}\n')
    write("corpus/c.txt", "third")
    write("corpus/notes.md", "not data")
    docs, stats = read(tmp_path / "corpus")
    assert docs == ["first", "first b", "second", "third"]
    assert (stats.files, stats.ignored_files, stats.documents_read) == (3, 1, 4)


def test_glob_and_errors_for_no_match_or_bad_extension(write, tmp_path):
    write("g/one.txt", "1")
    write("g/two.txt", "2")
    assert read(tmp_path / "g" / "*.txt")[0] == ["1", "2"]
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(DataError, match=re.escape(f"{pattern}: no file, folder or glob match")):
        read(pattern)
    csv = write("table.csv", "a,b\n")
    with pytest.raises(DataError, match=r"table\.csv: unsupported file type '\.csv'"):
        read(csv)


# ----------------------------------------------------------------------------- cleaning


def test_clean_is_a_no_op_on_ordinary_prose():
    prose = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    assert clean_text(prose) == prose
    verse = "Indented:\n    kept as is\n\tand tabs at line start too"
    assert clean_text(verse) == verse


def test_clean_unicode_and_control_characters():
    assert clean_text("ﬁne Ｆｕｌｌ ①") == "fine Full 1"  # NFKC
    assert clean_text("ﬁne", normalize_unicode=False) == "ﬁne"
    assert clean_text("a\x00b\x07c\x1bd\x7fe\x85f\ufeffg\th") == "abcdefg\th"
    assert clean_text("win\r\nmac\rnix\n") == "win\nmac\nnix"
    family = "👨\u200d👩\u200d👧"  # zero-width joiners hold the emoji together: kept
    assert clean_text(family) == family


def test_clean_html_tags_and_entities():
    html = "<html><head><style>p {x: 1}</style></head><p>Fish &amp; chips</p><p>costs &#163;5 &euro;</p><!-- c --><script>alert(1)</script>"
    assert clean_text(html) == "Fish & chips\ncosts £5 €"
    assert clean_text("a &lt;b&gt; tag") == "a <b> tag"  # escaped markup is text, not a tag
    for text in ("if a < b and c > d", "<<48/2=24>>", "AT&T &not; &notice R&D", "x<3"):
        assert clean_text(text, normalize_unicode=False) == text.replace("&not;", "¬")
    assert clean_text("<b>bold</b>", remove_html=False) == "<b>bold</b>"


def test_clean_whitespace():
    assert clean_text("a   b\t\tc \t d  \n\n\n\n\ne   \n") == "a b c d\n\ne"
    assert clean_text("\n\n  \n  first line indented\n") == "  first line indented"
    assert clean_text(" \n\t \n") == ""


# -------------------------------------------------------------------------------- dedup


def test_exact_and_near_duplicates_are_counted(write):
    base = [make_words(200, seed) for seed in range(6)]
    words = base[1].split()
    words[100] = "DIFFERENT"  # one word of 200: Jaccard of word 5-grams ~0.95
    near = " ".join(words)
    half = " ".join(base[2].split()[:100] + base[3].split()[:100])  # shares ~50%: distinct
    rng = random.Random(0)
    cjk = "".join(rng.choice("山水风月花鸟云雨春秋天地人日") for _ in range(300))
    cjk_near = cjk[:150] + "海" + cjk[151:]
    records = [
        *base,
        base[0],  # exact
        base[4].replace(" ", "  ") + "\n\n\n",  # exact after cleaning
        near,
        half,
        cjk,
        cjk_near,
        "x" * 3,  # short
        "y" * 5000,  # long
        "   ",  # empty after cleaning
    ]
    path = write("c.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in records))
    docs, stats = clean_corpus(str(path), min_chars=5, max_chars=4000, seed=0)
    assert stats.documents_read == len(records)
    assert (stats.dropped_short, stats.dropped_long, stats.dropped_empty) == (1, 1, 1)
    assert stats.exact_duplicates == 2
    assert stats.near_duplicates == 2  # `near` and `cjk_near`
    assert docs == [*base, half, cjk]
    assert stats.kept == len(docs) and stats.chars_kept == sum(map(len, docs))

    docs, stats = clean_corpus(str(path), min_chars=5, max_chars=4000, near_dedup=False)
    assert (stats.exact_duplicates, stats.near_duplicates, len(docs)) == (2, 0, 10)
    docs, stats = clean_corpus(
        str(path), min_chars=5, max_chars=4000, dedup=False, near_dedup=False
    )
    assert (stats.exact_duplicates, len(docs)) == (0, 12)


def test_near_dedup_threshold_is_respected(write):
    a = make_words(200, 0)
    words = a.split()
    for i in range(0, 200, 10):
        words[i] = "CHANGED"  # 20 of 200 words: most 5-grams differ, Jaccard well below 0.85
    path = write("c.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in (a, " ".join(words))))
    assert clean_corpus(str(path))[1].near_duplicates == 0
    assert clean_corpus(str(path), near_dedup_threshold=0.1)[1].near_duplicates == 1
