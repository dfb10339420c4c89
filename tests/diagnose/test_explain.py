"""lmforge explain: attention maps are the model's own (causal: zero above the diagonal),
integrated gradients are complete, the page is written, and bad requests say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.tiny_checkpoint import write_tiny_decoder

from lmforge.checkpoint.load import load
from lmforge.diagnose.explain import attribute, recording_attention, target_score
from lmforge.errors import ConfigError
from lmforge.models.encoder import Encoder, EncoderConfig, HeadConfig, SequenceClassifier
from lmforge.models.layers import attend
from lmforge.recipes.explain import ExplainConfig, explain

CORPORA = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "data" / "corpora"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (CORPORA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    return write_tiny_decoder(tmp_path_factory.mktemp("explain") / "ckpt", text, 300, 64)


def test_causal_attention_maps_are_zero_above_the_diagonal_and_rows_sum_to_one(ckpt: Path) -> None:
    model, tok, _ = load(ckpt)
    ids = torch.tensor([tok.encode("ROMEO: But soft, what light").ids])
    with torch.no_grad(), recording_attention() as maps:
        logits = model(ids)
    assert len(maps) == model.cfg.n_layer
    T = ids.size(1)
    for att in maps:
        assert att.shape == (1, model.cfg.n_head, T, T)
        assert torch.all(att.triu(diagonal=1) == 0)
        torch.testing.assert_close(att.sum(-1), torch.ones(1, model.cfg.n_head, T))
    assert attend is __import__("lmforge.models.layers", fromlist=["attend"]).attend  # restored
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits)  # recording changed nothing


def test_integrated_gradients_are_complete(ckpt: Path) -> None:
    """Σ attributions = f(input) − f(baseline) up to the integral's error."""
    model, tok, _ = load(ckpt)
    ids = torch.tensor([tok.encode("ROMEO: But soft").ids])
    a = attribute(model, ids, target=5, baseline_id=0, decoder=True, n_steps=300)
    assert sum(a.integrated_gradients) == pytest.approx(a.score - a.baseline_score, abs=2e-3)
    assert a.delta < 2e-3
    assert len(a.gradient_x_input) == ids.size(1)


def test_encoder_attention_is_bidirectional_and_attributions_complete() -> None:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=32))
    model = SequenceClassifier(enc, HeadConfig(num_labels=3)).eval()
    ids = torch.randint(1, 50, (1, 9))
    with torch.no_grad(), recording_attention() as maps:
        target_score(model, ids, decoder=False)
    assert len(maps) == 2 and (maps[0].triu(diagonal=1) > 0).any()  # sees later tokens
    a = attribute(model, ids, target=1, baseline_id=0, decoder=False, n_steps=300)
    assert sum(a.integrated_gradients) == pytest.approx(a.score - a.baseline_score, abs=2e-3)


def test_the_page_and_pictures_are_written(ckpt: Path, tmp_path: Path) -> None:
    page = explain(
        ExplainConfig(checkpoint=str(ckpt), prompt="ROMEO: But", out_dir=str(tmp_path / "x"))
    )
    text = page.read_text()
    assert "Integrated gradients" in text and "Logit lens" in text and "completeness" in text
    assert (tmp_path / "x" / "attention_layer0.png").stat().st_size > 1000
    assert text.count("<span title=") == 2 * len(load(ckpt).tokenizer.encode("ROMEO: But").ids)


def test_bad_requests_say_what_to_do(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one token"):
        explain(ExplainConfig(checkpoint=str(ckpt), prompt="ROMEO", out_dir=str(tmp_path),
                              target="a long target text"))  # fmt: skip
    with pytest.raises(ConfigError, match="reads at most 64"):
        explain(ExplainConfig(checkpoint=str(ckpt), prompt="to be " * 100, out_dir=str(tmp_path)))
    done = subprocess.run([sys.executable, "-m", "lmforge", "explain", "--checkpoint", str(ckpt),
                           "--prompt", "", "--out_dir", str(tmp_path / "e")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "prompt is empty" in done.stderr
