"""T5 and BART in and out of Hugging Face: tiny random ``T5ForConditionalGeneration`` and
``BartForConditionalGeneration`` folders load through ``lmforge.load`` with equal logits (fp32,
atol 1e-4) and identical greedy output; an export reloads in ``transformers`` with equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

import lmforge
from lmforge.errors import CheckpointError
from lmforge.interop.hf_seq2seq import export_hf_seq2seq
from lmforge.models.seq2seq import Seq2Seq, generate

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # T5 v1.1 style: gated GELU, 3 decoder layers against 2 encoder layers
    "t5-gated": lambda: transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        num_decoder_layers=3, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    ),
    # T5 v1.0 style: ReLU, heads narrower than d_model / n_head, few buckets (distances > 20
    # share the last bucket: the logarithmic range is exercised), no output scaling
    "t5-relu": lambda: transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=6, num_heads=4, d_ff=64, num_layers=2,
        feed_forward_proj="relu", relative_attention_num_buckets=8,
        relative_attention_max_distance=20, tie_word_embeddings=False, decoder_start_token_id=0,
    ),
    "bart": lambda: transformers.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, scale_embedding=True,
    ),
}  # fmt: skip


def _hf_class(name: str):
    if name.startswith("t5"):
        return transformers.T5ForConditionalGeneration
    return transformers.BartForConditionalGeneration


@pytest.fixture(params=list(CONFIGS))
def hf_folder(request, tmp_path: Path) -> tuple[str, Path, torch.nn.Module]:
    """A saved random model whose norms, biases and logits bias are far from their init (so a
    swapped or missing tensor shows in the logits)."""
    torch.manual_seed(0)
    name = request.param
    hf = _hf_class(name)(CONFIGS[name]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        if name == "bart":
            hf.final_logits_bias.normal_(std=0.1)
    hf.save_pretrained(tmp_path / name)
    _word_tokenizer().save(str(tmp_path / name / "tokenizer.json"))
    return name, tmp_path / name, hf


def _word_tokenizer() -> Tokenizer:
    """99 word-level tokens: ids only matter here, the model is random."""
    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)}, unk_token="w2"))


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 99, (2, 30), generator=g)  # 30 > 20: beyond the last exact bucket
    mask = torch.ones_like(x)
    mask[1, 21:] = 0  # a padded row
    y = torch.randint(3, 99, (2, 25), generator=g)
    return x, mask, y


def test_logits_match_transformers(hf_folder) -> None:
    name, folder, hf = hf_folder
    model, _tok, manifest = lmforge.load(folder)
    assert isinstance(model, Seq2Seq)
    assert (manifest.kind, manifest.family) == ("encoder-decoder", name.split("-")[0])
    x, mask, y = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        got = model(x, y, mask)
    assert got.shape == (2, 25, 99)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_greedy_output_matches_transformers(hf_folder) -> None:
    _name, folder, hf = hf_folder
    model, _tok, _ = lmforge.load(folder)
    x, mask, _ = _inputs()
    ours = generate(model, x, mask, max_new_tokens=15)
    # transformers' own loop, no cache (its T5 cache assumes as many decoder as encoder layers)
    ref = hf.generate(
        input_ids=x, attention_mask=mask, max_new_tokens=15, do_sample=False, num_beams=1,
        use_cache=False, forced_eos_token_id=None, forced_bos_token_id=None,
    )[:, 1:]  # fmt: skip
    eos = model.cfg.eos_id
    for row_ours, row_ref in zip(ours.tolist(), ref.tolist(), strict=True):
        # both stop at eos; transformers pads finished rows with pad_id, as lmforge does
        cut = row_ref.index(eos) + 1 if eos in row_ref else len(row_ref)
        assert row_ours[:cut] == row_ref[:cut]
    assert ours[0].tolist() != ours[1].tolist(), "rows from different sources must differ"


def test_export_reloads_in_transformers_with_equal_logits(hf_folder, tmp_path: Path) -> None:
    name, folder, _hf = hf_folder
    model, tok, _ = lmforge.load(folder)
    out = export_hf_seq2seq(model, tok, tmp_path / "exported")
    back = _hf_class(name).from_pretrained(out).eval()
    x, mask, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits,
            model(x, y, mask),
            atol=1e-4,
            rtol=0,
        )
    # and lmforge reads its own export back
    again, _, _ = lmforge.load(out)
    with torch.no_grad():
        torch.testing.assert_close(again(x, y, mask), model(x, y, mask), atol=0, rtol=0)


def test_unsupported_variants_name_the_key(tmp_path: Path) -> None:
    cfg = CONFIGS["t5-gated"]()
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "m")
    _word_tokenizer().save(str(tmp_path / "m" / "tokenizer.json"))
    path = tmp_path / "m" / "config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps(conf | {"feed_forward_proj": "gated-silu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-silu'"):
        lmforge.load(tmp_path / "m")
    path.write_text(json.dumps({k: v for k, v in conf.items() if k != "d_kv"}))
    with pytest.raises(CheckpointError, match="'d_kv' is missing"):
        lmforge.load(tmp_path / "m")


def test_wrong_kind_is_refused(hf_folder) -> None:
    _name, folder, _hf = hf_folder
    with pytest.raises(CheckpointError, match="encoder-decoder"):
        lmforge.load(folder, expect="decoder")
