"""ONNX out: decoder graphs onnxruntime can generate with, and encoder/classifier graphs.

A decoder export is two graphs (optimum's layout, so onnxruntime users recognise it):

    model.onnx               input_ids (B, T) → logits (B, T, V)
    decoder_with_past.onnx   input_ids (B, T), attention_mask (B, P+T), position_ids (B, T),
                             past.{i}.key / past.{i}.value (B, n_kv, P, hd) for every block i
                             → logits (B, T, V), present.{i}.key / present.{i}.value (B, n_kv, P+T, hd)

Batch, sequence and past lengths are dynamic axes; a past of length 0 is the prefill, so one
session decodes a (left-padded) batch from its prompt on. ``attention_mask`` is 1 for real
tokens, 0 for left padding; ``position_ids`` count the real tokens before each one.

The Decoder's own KV cache is written in place (fast in eager, see ``layers.KVCache``); a graph
with a past of any length needs the functional form, so ``DecoderGraph`` runs the model's own
modules with ``torch.cat`` onto the past instead. Encoders export as one graph:
input_ids, attention_mask, token_type_ids (B, T) → logits (classifiers, MLM) or hidden states.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). The TorchScript
exporter (``dynamo=False``) was tried first and cannot export ``aten::rms_norm`` (Llama) at any
opset it writes; the dynamo exporter takes both families, a past of length 0 at run time
(declared ``Dim("past", min=0)``), and needs the encoder to skip its data-dependent "no padding?"
shortcut while exporting (``torch.compiler.is_exporting``). About 10-15 s per graph on this CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder, MaskedLMHead, SequenceClassifier, TokenClassifier
from lmforge.models.layers import padded_attention

FULL, WITH_PAST, ENCODER = "model.onnx", "decoder_with_past.onnx", "model.onnx"


def past_names(n_layer: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every block, in graph order."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class DecoderGraph(nn.Module):
    """The Decoder as a pure function of (ids, mask, positions, past) → (logits, present)."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        B, T = input_ids.shape
        mask, _ = padded_attention(attention_mask.bool(), T)  # (B, 1, T, P+T)
        x = m.tok_emb(input_ids)  # (B, T, C)
        if m.pos_emb is not None:
            x = x + m.pos_emb(position_ids)
        present: list[torch.Tensor] = []
        for i, block in enumerate(m.blocks):
            attn = block.attn
            hd = attn.head_dim
            h = block.norm1(x)
            q, k, v = attn.qkv(h).split(
                [attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd], dim=-1
            )
            q = q.reshape(B, T, attn.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.reshape(B, T, attn.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = v.reshape(B, T, attn.n_kv_head, hd).transpose(1, 2)
            if attn.rope is not None:
                q, k = attn.rope(q, position_ids), attn.rope(k, position_ids)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, nkv, P+T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            if attn.n_kv_head != attn.n_head:  # GQA: each kv head serves n_head/n_kv queries
                k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
                v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
            # SDPA directly, not layers.attend: under the tracer attend's GQA test is a tensor;
            # fp32 is the dtype attend sends to SDPA anyway
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.norm2(x))
        return (m.lm_head(m.norm_f(x)), *present)


EncoderModel = Encoder | SequenceClassifier | TokenClassifier | MaskedLMHead


class EncoderGraph(nn.Module):
    """(input_ids, attention_mask, token_type_ids) → the model's output (logits or states)."""

    def __init__(self, model: EncoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids, token_type_ids, attention_mask)


def _export(module: nn.Module, args: tuple[Any, ...], path: Path, inputs: list[str],
            outputs: list[str], shapes: tuple[Any, ...]) -> None:  # fmt: skip
    """torch.export → ONNX (onnxscript), weights inside the file unless they pass 1 GiB
    (protobuf's 2 GiB limit; larger models get a ``.data`` file next to the graph)."""
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # "torchvision is not installed", progress lines, the optimizer's "Replaced initializer"
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecations inside the exporter, not ours
            torch.onnx.export(
                module, args, str(path), dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                output_names=outputs, external_data=n_bytes > 2**30,
            )  # fmt: skip
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def export_decoder_onnx(model: Decoder, out: Path) -> list[Path]:
    """Write ``model.onnx`` and ``decoder_with_past.onnx`` for ``model`` (fp32, CPU) into ``out``."""
    model = model.float().eval()
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_head
    batch, seq = Dim("batch"), Dim("sequence", max=cfg.context_length)
    B, T, P = 2, 3, 4  # example sizes; every one is a dynamic axis (P = 0 included)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        _export(model, (ids,), out / FULL, ["input_ids"], ["logits"], ({0: batch, 1: seq},))
        mask = torch.ones(B, P + T, dtype=torch.int64)
        mask[0, :2] = 0  # a left-padded row
        positions = (mask.cumsum(1) - 1).clamp_min(0)[:, P:]
        past = tuple(torch.randn(B, cfg.kv_heads, P, hd) for _ in range(2 * cfg.n_layer))
        past_len, total = Dim("past", min=0), Dim("total")
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                  tuple({0: batch, 2: past_len} for _ in past))  # fmt: skip
        names = ["input_ids", "attention_mask", "position_ids", *past_names(cfg.n_layer, "past")]
        outputs = ["logits", *past_names(cfg.n_layer, "present")]
        _export(DecoderGraph(model), (ids, mask, positions, *past), out / WITH_PAST, names,
                outputs, shapes)  # fmt: skip
    return [out / FULL, out / WITH_PAST]


def export_encoder_onnx(model: EncoderModel, out: Path) -> list[Path]:
    """Write ``model.onnx`` for an encoder or encoder + head (fp32, CPU) into ``out``."""
    model = model.float().eval()
    enc = model if isinstance(model, Encoder) else model.encoder
    B, T = 2, 5
    ids = torch.randint(0, enc.cfg.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, -2:] = 0
    batch, seq = Dim("batch"), Dim("sequence", max=enc.cfg.context_length)
    output = "last_hidden_state" if isinstance(model, Encoder) else "logits"
    with torch.no_grad():
        _export(EncoderGraph(model), (ids, mask, torch.zeros_like(ids)), out / ENCODER,
                ["input_ids", "attention_mask", "token_type_ids"], [output],
                ({0: batch, 1: seq},) * 3)  # fmt: skip
    return [out / ENCODER]


# ---- running the export with onnxruntime ------------------------------------------------------


def session(path: Path) -> Any:
    """An onnxruntime CPU session for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_greedy(
    sess: Any, prompt_ids: Sequence[int], max_new_tokens: int, n_layer: int, kv_heads: int,
    head_dim: int, stop: set[int] | None = None,
) -> list[int]:  # fmt: skip
    """Greedy continuation of one prompt with ``decoder_with_past.onnx``: prefill (empty past),
    then one token per run, the present keys/values fed back as the next past."""
    stop = stop or set()
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)  # (1, T)
    past = {
        n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names(n_layer, "past")
    }
    total, out = 0, []
    for _ in range(max_new_tokens):
        T = ids.shape[1]
        feeds = dict(past, input_ids=ids, attention_mask=np.ones((1, total + T), np.int64),
                     position_ids=np.arange(total, total + T, dtype=np.int64)[None])  # fmt: skip
        logits, *present = sess.run(None, feeds)
        total += T
        past = dict(zip(past_names(n_layer, "past"), present, strict=True))
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        ids = np.asarray([[token]], dtype=np.int64)
    return out


def write_onnx_config(out: Path, info: dict[str, Any]) -> None:
    """``onnx_config.json``: what a consumer needs to feed the graphs (names, sizes, special ids)."""
    (out / "onnx_config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
