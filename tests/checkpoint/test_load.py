"""``lmforge.load`` and the manifest: every checkpoint says what it is, old ones are recognised,
the wrong kind is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

import lmforge
from lmforge.checkpoint.manifest import MANIFEST, describe, infer_manifest
from lmforge.checkpoint.store import save_checkpoint
from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import (
    Encoder,
    EncoderConfig,
    HeadConfig,
    MaskedLMHead,
    SequenceClassifier,
)

DEC = dict(arch="llama", vocab_size=16, context_length=16, n_layer=1, n_head=2, d_model=16)
ENC = dict(vocab_size=16, context_length=16, n_layer=1, n_head=2, d_model=16, d_ff=32)


def tokenizer_file(path: Path) -> Path:
    vocab = {f"t{i}": i for i in range(15)} | {"[UNK]": 15}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    return path


def decoder_run(tmp_path: Path, manifest: bool = True) -> tuple[Path, Decoder]:
    """A pretrain-style run folder: checkpoints/step-000003 with config.yaml's model section."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**DEC))
    config = yaml.safe_dump({"model": model.cfg.model_dump(mode="json"), "train": {}})
    files = {"config.yaml": config, "tokenizer.json": tokenizer_file(tmp_path / "tok.json")}
    ckpt = save_checkpoint(tmp_path / "run", 3, model, {"step": 3}, files)
    if not manifest:  # written the way lmforge wrote checkpoints before the manifest
        (ckpt / MANIFEST).unlink()
    return tmp_path / "run", model


def classifier_run(tmp_path: Path, manifest: bool = True) -> tuple[Path, SequenceClassifier]:
    torch.manual_seed(0)
    enc, head = EncoderConfig(**ENC), HeadConfig(num_labels=3)
    model = SequenceClassifier(Encoder(enc), head)
    config = {
        "task": "classify",
        "model": enc.model_dump(mode="json"),
        "head": head.model_dump(mode="json"),
        "method": "full",
    }
    files = {
        "config.yaml": yaml.safe_dump(config),
        "tokenizer.json": tokenizer_file(tmp_path / "tok.json"),
    }
    ckpt = save_checkpoint(tmp_path / "cls", 5, model, {"step": 5}, files)
    if not manifest:
        (ckpt / MANIFEST).unlink()
    return tmp_path / "cls", model


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "old-checkpoint"])
def test_load_a_decoder_gives_the_saved_model(tmp_path: Path, manifest: bool) -> None:
    run, saved = decoder_run(tmp_path, manifest)
    model, tokenizer, m = lmforge.load(run)  # a run folder: its latest checkpoint
    assert (m.kind, m.family, m.source, m.inferred) == ("decoder", "llama", "lmforge", not manifest)
    assert m.path == run / "checkpoints" / "step-000003"
    assert tokenizer.get_vocab_size() == 16 and not model.training
    x = torch.randint(0, 16, (2, 7))
    logits = model(x)
    assert logits.shape == (2, 7, 16)  # (B, T, V)
    assert torch.equal(logits, saved.eval()(x))


def test_manifest_file_says_what_the_checkpoint_is(tmp_path: Path) -> None:
    run, _ = decoder_run(tmp_path)
    written = json.loads((run / "checkpoints" / "step-000003" / MANIFEST).read_text())
    assert written == {
        "version": 1,
        "kind": "decoder",
        "family": "llama",
        "source": "lmforge",
        "tokenizer": "tokenizer.json",
        "sharded_optimizer": False,
        "lora": False,
        "base": None,
    }


def test_describe_takes_the_kind_from_the_model() -> None:
    enc = Encoder(EncoderConfig(**ENC))
    assert describe(MaskedLMHead(enc), True).kind == "encoder-mlm"
    assert describe(SequenceClassifier(enc, HeadConfig()), True).kind == "sequence-classifier"
    assert describe(Decoder(DecoderConfig(**{**DEC, "arch": "gpt2"})), False).family == "gpt2"
    from lmforge.models.lora import LoraConfig, apply_lora

    lora = apply_lora(Decoder(DecoderConfig(**DEC)), LoraConfig(rank=2, targets=["attn.qkv"]))
    assert describe(lora, False).lora


def test_old_folders_are_recognised_from_config_yaml(tmp_path: Path) -> None:
    def folder(name: str, config: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
        return tmp_path / name

    assert infer_manifest(folder("mlm", {"task": "mlm", "model": {}})).kind == "encoder-mlm"
    cls = infer_manifest(folder("cls", {"task": "classify", "method": "lora"}))
    assert (cls.kind, cls.lora) == ("sequence-classifier", True)
    ft = infer_manifest(folder("ft", {"base": "x", "method": "lora"}))
    assert (ft.kind, ft.lora) == ("decoder", True)
    assert infer_manifest(folder("pre", {"model": {"arch": "gpt2"}})).family == "gpt2"


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "old-checkpoint"])
def test_classifier_loads_and_is_refused_where_a_decoder_is_needed(
    tmp_path: Path, manifest: bool
) -> None:
    run, saved = classifier_run(tmp_path, manifest)
    model, _, m = lmforge.load(run)
    assert m.kind == "sequence-classifier" and isinstance(model, SequenceClassifier)
    x = torch.randint(0, 16, (2, 5))
    assert torch.equal(model(x), saved.eval()(x))
    with pytest.raises(CheckpointError, match=r"is a sequence classifier .*lmforge eval"):
        lmforge.load(run, expect="decoder")


def test_generate_on_a_classifier_exits_2_saying_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, _ = classifier_run(tmp_path)
    assert main(["generate", f"--checkpoint={run}", "--prompt=t1"]) == 2
    err = capsys.readouterr().err
    assert "sequence classifier" in err and "lmforge eval" in err and "Traceback" not in err


def test_adapter_folder_names_its_base_and_the_merge_command(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    conf = {"peft_type": "LORA", "base_model_name_or_path": "runs/base", "r": 2}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"LoRA adapter for base runs/base.*lmforge merge"):
        lmforge.load(tmp_path / "adapter")


def test_finetune_training_checkpoint_points_to_resume_and_model_folder(tmp_path: Path) -> None:
    model = Decoder(DecoderConfig(**DEC))
    files = {"config.yaml": yaml.safe_dump({"base": "x", "method": "full"})}
    save_checkpoint(tmp_path, 1, model, {"step": 1}, files)
    with pytest.raises(CheckpointError, match=r"finetune --resume.*model/ folder"):
        lmforge.load(tmp_path)


def test_hugging_face_folder_loads_with_an_inferred_manifest(tmp_path: Path) -> None:
    from lmforge.interop.hf import export_hf

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**DEC)).eval()
    tok = Tokenizer.from_file(str(tokenizer_file(tmp_path / "tok.json")))
    out = export_hf(model, tok, tmp_path / "hf")
    loaded, _, m = lmforge.load(out)
    assert (m.kind, m.source, m.family) == ("decoder", "hf", "llama")
    x = torch.randint(0, 16, (1, 6))
    torch.testing.assert_close(loaded(x), model(x))


def test_newer_manifest_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    run, _ = decoder_run(tmp_path)
    path = run / "checkpoints" / "step-000003" / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    with pytest.raises(CheckpointError, match=r"manifest.json: manifest version 99 .*upgrade"):
        lmforge.load(run)


def test_bad_manifest_field_is_named(tmp_path: Path) -> None:
    run, _ = decoder_run(tmp_path)
    path = run / "checkpoints" / "step-000003" / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "kind": "vit"}))
    with pytest.raises(CheckpointError, match=r"(?s)manifest.json.*kind: Input should be"):
        lmforge.load(run)


def test_import_lmforge_stays_cheap() -> None:
    code = "import sys, lmforge; assert 'torch' not in sys.modules; assert callable(lmforge.load)"
    subprocess.run([sys.executable, "-c", code], check=True)
