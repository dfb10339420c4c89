"""``lmforge eval`` on a text file: the shipped Chinese slice by its ``pkg:`` name, and
``--max_bytes`` scoring the same held-out tail that ``lmforge compress`` scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tests.tiny_checkpoint import write_tiny_decoder

import lmforge
from lmforge.cli import main
from lmforge.compress.measure import SHIPPED_CHINESE, held_out, lm_quality

PKG = "pkg:lmforge/data/corpora/chinese_classical.txt"


def test_shipped_chinese_slice_is_small_documented_and_licensed() -> None:
    raw = SHIPPED_CHINESE.read_bytes()
    assert 100_000 < len(raw) <= 200_000
    text = raw.decode("utf-8")
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) > 40_000  # CJK ideographs, not mojibake
    readme = (SHIPPED_CHINESE.parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(raw).hexdigest() in readme  # the README describes this very file
    assert "MIT" in (SHIPPED_CHINESE.parent / "chinese_classical_LICENSE").read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    text = Path("src/lmforge/data/corpora/tinyshakespeare.txt").read_text()[:20000]
    return write_tiny_decoder(tmp_path_factory.mktemp("ev") / "ckpt", text, 300, 64)


def test_eval_takes_the_shipped_chinese_text_and_scores_the_tail_compress_scores(
    tiny: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ev"
    assert main(["eval", f"--checkpoint={tiny}", f"--data={PKG}", "--max_bytes=3000",
                 f"--out_dir={out}"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    tail = held_out(SHIPPED_CHINESE.read_text(encoding="utf-8"), 3000)
    assert report["bytes"] == len(tail.encode("utf-8")) <= 3000
    model, tok, _ = lmforge.load(tiny)
    expected = lm_quality(model, tok, tail)["val_bpb"]
    assert report["val_bpb"] == pytest.approx(expected, rel=1e-6)
    # an untrained model predicts Chinese bytes it never saw badly: a real cost, not 0
    assert report["val_bpb"] > 1.0


def test_max_bytes_on_prepared_tokens_and_a_missing_package_file_exit_2(
    tiny: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    assert main(["eval", f"--checkpoint={tiny}", f"--data={data}", "--max_bytes=10"]) == 2
    missing = "pkg:lmforge/data/corpora/no_such.txt"
    assert main(["eval", f"--checkpoint={tiny}", f"--data={missing}"]) == 2
