"""``lmforge compress prune``: structured pruning removes exactly the units it names (the small
model equals the original with those units switched off), the importance scores rank a dead
unit last, magnitude pruning reaches its sparsity permanently, and the CLI writes a smaller
checkpoint that ``lmforge.load`` and ``generate`` accept, with a sweep plot and a recovery
fine-tune that keeps the zeros."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_model
from tests.tiny_checkpoint import write_tiny_decoder

import lmforge
from lmforge.cli import main
from lmforge.compress import prune as pr
from lmforge.data.tokenizer import save_tokenizer, train_tokenizer
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import EncoderConfig, HeadConfig, build_task_model

TEXT = Path("src/lmforge/data/corpora/tinyshakespeare.txt").read_text()[:30000]


def _model(arch: str, n_kv_head: int | None) -> Decoder:
    cfg = DecoderConfig(arch=arch, vocab_size=50, context_length=32, n_layer=2, n_head=4,
                        n_kv_head=n_kv_head, d_model=32)  # fmt: skip
    torch.manual_seed(0)
    return Decoder(cfg).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 12), generator=g), torch.randint(0, 50, (2, 12), generator=g)


@pytest.mark.parametrize(("arch", "kv"), [("llama", 2), ("gpt2", None)])
@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_structured_model_equals_the_original_with_the_removed_units_off(
    arch: str, kv: int | None, importance: str
) -> None:
    model, (x, y) = _model(arch, kv), _batch()
    scores = (
        pr.taylor_scores(model, [(x, y)]) if importance == "taylor" else pr.magnitude_scores(model)
    )
    small = pr.prune_structured(model, 0.5, 0.25, scores).eval()
    with pr.unit_gates(model) as gates, torch.no_grad():
        for (g_attn, g_mlp), (s_attn, s_mlp) in zip(gates, scores, strict=True):
            g_attn.zero_()[pr.keep_top(s_attn, 0.5)] = 1
            g_mlp.zero_()[pr.keep_top(s_mlp, 0.25)] = 1
        reference = model(x)
    with torch.no_grad():
        out = small(x)
        caches = small.new_kv_caches(2)  # the smaller kv heads are cached per block
        stepwise = torch.cat([small(x[:, :5], 0, caches), small(x[:, 5:], 5, caches)], dim=1)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(stepwise, out, rtol=1e-5, atol=1e-5)
    assert small.num_params() < model.num_params()
    heads = model.cfg.n_head // 2
    assert [s.n_head for s in small.cfg.layers] == [heads, heads]
    assert [s.d_ff for s in small.cfg.layers] == [model.cfg.ff_width * 3 // 4] * 2


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_a_dead_head_and_a_dead_channel_are_ranked_last(importance: str) -> None:
    model, batch = _model("gpt2", None), _batch()
    hd = model.cfg.d_model // model.cfg.n_head
    with torch.no_grad():  # head 2 of block 0 and channel 7 of block 1 write nothing
        model.blocks[0].attn.proj.weight[:, 2 * hd : 3 * hd] = 0
        model.blocks[1].mlp.proj.weight[:, 7] = 0
    scores = (
        pr.taylor_scores(model, [batch]) if importance == "taylor" else pr.magnitude_scores(model)
    )
    assert int(scores[0][0].argmin()) == 2 and float(scores[0][0][2]) == 0
    assert int(scores[1][1].argmin()) == 7 and float(scores[1][1][7]) == 0
    kept = pr.keep_top(scores[0][0], 0.25)  # one head of four goes: the dead one
    assert 2 not in kept.tolist() and len(kept) == 3


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_its_sparsity_permanently(scope: str) -> None:
    model = _model("llama", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pr.prune_unstructured(model, 0.6, scope)
    assert set(model.state_dict()) == set(before)  # no weight_orig / weight_mask left
    assert pr.sparsity(model) == pytest.approx(0.6, abs=0.01)
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in pr.prunable(model)]
    if scope == "layer":
        assert per_layer == pytest.approx([0.6] * len(per_layer), abs=0.01)
    else:  # one threshold over all layers: the layers end up with different sparsities
        assert max(per_layer) - min(per_layer) > 0.05
    names = {id(m): n for n, m in model.named_modules()}
    for m, _ in pr.prunable(model):
        kept = m.weight != 0  # the surviving weights are untouched
        assert torch.equal(m.weight[kept], before[names[id(m)] + ".weight"][kept])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("p") / "src", TEXT, 300, 64)


def test_cli_structured_prune_writes_a_smaller_checkpoint_generate_accepts(
    source: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "p"
    assert main(["compress", "prune", f"--checkpoint={source}", f"--out_dir={out}",
                 "--amount=0.5", "--max_eval_bytes=4000", "--context=32",
                 "--calibration_batches=2", "--sweep=[0,0.5]"]) == 0  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    model, _, _ = lmforge.load(out)
    assert model.num_params() == report["parameters_after"] < report["parameters_before"]
    assert report["bytes_after"] < report["bytes_before"]
    assert [s["n_head"] for s in report["layers"]] == [1, 1]
    assert (out / "plots" / "sparsity.png").stat().st_size > 0
    sweep = {p["amount"]: p for p in report["sweep"]}
    assert sweep[0.0]["val_bpb"] == pytest.approx(report["quality"]["val_bpb"]["before"])
    assert sweep[0.5]["val_bpb"] == pytest.approx(report["quality"]["val_bpb"]["after"])
    capsys.readouterr()
    assert main(["generate", f"--checkpoint={out}", "--prompt=ROMEO:", "--max_new_tokens=5",
                 "--temperature=0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("ROMEO:")
    # per-layer shapes: Hugging Face and GGUF cannot hold them, ONNX can
    assert main(["export", f"--checkpoint={out}", "--format=gguf", f"--out_dir={tmp_path}/g"]) == 2
    assert "pruned structurally" in capsys.readouterr().err


def test_cli_recovery_keeps_the_zeros_and_lowers_the_loss(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert main(["compress", "prune", f"--checkpoint={source}", f"--out_dir={out}",
                 "--method=magnitude-layer", "--amount=0.5", "--max_eval_bytes=4000",
                 "--context=32", "--recover_steps=30", "--recover_lr=3e-3"]) == 0  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    model, _, _ = lmforge.load(out)
    assert pr.sparsity(model) == pytest.approx(0.5, abs=0.01)  # recovery kept the zeros
    pruned = report["quality"]["val_bpb"]["after"]
    assert report["quality_after_recovery"]["val_bpb"]["after"] < pruned
    assert (out / "recovery_metrics.jsonl").is_file()


def test_structured_prune_of_a_classifier_is_refused_by_name(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cls"
    folder.mkdir()
    enc = EncoderConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, context_length=16)
    save_model(build_task_model(enc, HeadConfig(num_labels=2)), str(folder / "model.safetensors"))
    cfg = {"task": "classify", "model": enc.model_dump(mode="json"), "head": {"num_labels": 2}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_tokenizer(train_tokenizer([TEXT], vocab_size=300), folder / "tokenizer.json")
    assert main(["compress", "prune", f"--checkpoint={folder}", f"--out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "sequence-classifier" in err and "magnitude-global" in err
