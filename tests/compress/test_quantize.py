"""``lmforge compress quantize``: quantized logits stay close to fp32, the saved checkpoint is
smaller, loads through ``lmforge.load`` with the very logits it had before saving, and
``generate`` / ``eval`` accept it. Crafted or damaged files are refused without running code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests.tiny_checkpoint import write_tiny_decoder

import lmforge
from lmforge.checkpoint.quantized import pack_int4, save_quantized, unpack_int4
from lmforge.cli import main
from lmforge.compress.quantize import METHODS, quantize_model
from lmforge.errors import CheckpointError
from lmforge.generate import generate_batch

TEXT = Path("src/lmforge/data/corpora/tinyshakespeare.txt").read_text()[:20000]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("q") / "src", TEXT, 300, 64)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_quantized_logits_close_to_fp32_and_equal_after_save_and_load(
    source: Path, tmp_path: Path, method: str
) -> None:
    model, tok, _ = lmforge.load(source)
    x = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        ref = model(x)
        names = quantize_model(model, method)
        q = model(x)
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.proj" in names
    # relative error of the logits (observed: int8 0.6-0.8 %, int4 9.6 % on this random model)
    rel = float((q - ref).norm() / ref.norm())
    assert 0 < rel < (0.15 if method.startswith("int4") else 0.015), rel
    out = tmp_path / "q"
    main(["compress", "quantize", f"--checkpoint={source}", f"--out_dir={out}",
          f"--method={method}", "--max_eval_bytes=3000"])  # fmt: skip
    loaded, _, manifest = lmforge.load(out)
    assert manifest.quantization == method
    with torch.no_grad():
        assert torch.equal(loaded(x), q)  # what was saved is what runs


def test_int8_and_int4_checkpoints_are_smaller_on_disk(tmp_path: Path) -> None:
    from lmforge.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(arch="llama", vocab_size=64, context_length=32, n_layer=2, n_head=4,
                        d_model=128)  # fmt: skip
    sizes = {}
    for method in (None, "int8-weight-only", "int4-weight-only"):
        torch.manual_seed(0)
        model = Decoder(cfg)
        if method:
            quantize_model(model, method)
        path = tmp_path / f"{method}.safetensors"
        save_quantized(model, path)
        sizes[method] = path.stat().st_size
    # linear weights are ~85 % of this model: int8 ≈ 1/4 of them, int4 ≈ 1/8 (+ scales)
    assert sizes["int8-weight-only"] < 0.4 * sizes[None]
    assert sizes["int4-weight-only"] < 0.75 * sizes["int8-weight-only"]


def test_int4_packing_round_trips_every_value() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)


def test_generate_and_eval_accept_a_quantized_checkpoint(
    source: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q8"
    assert main(["compress", "quantize", f"--checkpoint={source}", f"--out_dir={out}",
                 "--method=int8-dynamic", "--max_eval_bytes=3000"]) == 0  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]
    assert set(report["quality"]["val_bpb"]) == {"before", "after", "delta"}
    capsys.readouterr()
    assert main(["generate", f"--checkpoint={out}", "--prompt=ROMEO:", "--max_new_tokens=8",
                 "--temperature=0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    model, tok, _ = lmforge.load(out)
    prompt = tok.encode("ROMEO:").ids
    tokens = generate_batch(model, [prompt], max_new_tokens=8, eos_id=None)[0]
    assert printed.strip().startswith("ROMEO:")
    assert tok.decode(prompt + tokens).strip() in printed  # same greedy text as in Python
    text = tmp_path / "val.txt"
    text.write_text(TEXT[-3000:])
    assert main(["eval", f"--checkpoint={out}", f"--data={text}"]) == 0
    bpb = json.loads(capsys.readouterr().out)["val_bpb"]
    assert bpb == pytest.approx(report["quality"]["val_bpb"]["after"], rel=0.05)


def test_crafted_or_mismatched_quantized_files_are_refused(
    source: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    assert main(["compress", "quantize", f"--checkpoint={source}", f"--out_dir={out}",
                 "--max_eval_bytes=2000"]) == 0  # fmt: skip
    # export writes float formats: it names the float checkpoint to export instead
    assert main(["export", f"--checkpoint={out}", "--format=hf", f"--out_dir={tmp_path}/h"]) == 2
    assert "export the float checkpoint" in capsys.readouterr().err
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    # a class outside torchao's allow-list is never imported or called
    name = next(k for k in meta if k.endswith("qkv.weight"))
    meta[name] = json.dumps({"_type": "os.system", "_data": {"command": "touch PWNED"},
                             "_tensor_data_names": ["qdata"]})  # fmt: skip
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(CheckpointError, match="quantized weights cannot be rebuilt"):
        lmforge.load(out)
    assert not Path("PWNED").exists()
    # the manifest says quantized, the weights are plain float
    (out / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no description of quantized tensors"):
        lmforge.load(out)


def test_exact_match_is_measured_before_and_after_as_finetune_scores_it(
    source: Path, tmp_path: Path, capsys
) -> None:
    """Records whose answers are the model's own greedy answers score 1 before; the command
    reports the after-score of the quantized model, which the saved folder reproduces."""
    from lmforge.data.chat_template import ChatFormat
    from lmforge.eval.generation import QA, exact_match_eval

    model, tok, manifest = lmforge.load(source)
    fmt = ChatFormat.for_checkpoint(source, tok)
    users = [f"ROMEO: line {i}" for i in range(6)]
    pairs = [QA([{"role": "user", "content": u}], "?", "") for u in users]
    _, preds = exact_match_eval(model, fmt, pairs, max_new_tokens=4)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": u}, {"role": "assistant", "content": p.strip() or "x"}]})
        + "\n" for u, p in zip(users, preds, strict=True)))  # fmt: skip
    expected = sum(bool(p.strip()) for p in preds) / len(preds)
    out = tmp_path / "q4"
    assert main(["compress", "quantize", f"--checkpoint={source}", f"--out_dir={out}",
                 "--method=int4-weight-only", "--max_eval_bytes=2000",
                 f"--exact_match.data={data}", "--exact_match.max_new_tokens=4"]) == 0  # fmt: skip
    em = json.loads((out / "compression.json").read_text())["quality"]["exact_match"]
    assert em["before"] == pytest.approx(expected) and expected > 0
    q, qtok, _ = lmforge.load(out)
    _, qpreds = exact_match_eval(q, ChatFormat.for_checkpoint(out, qtok), pairs, 4)
    same = [a.strip() == (b.strip() or "x") for a, b in zip(qpreds, preds, strict=True)]
    assert em["after"] == pytest.approx(sum(same) / len(same))
    # a damaged chat file stops the command with a message naming the file
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["compress", "quantize", f"--checkpoint={source}", f"--out_dir={tmp_path}/b",
                 "--max_eval_bytes=2000", f"--exact_match.data={bad}"]) == 1  # fmt: skip
    assert "bad.jsonl" in capsys.readouterr().err
