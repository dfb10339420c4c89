"""``lmforge distill``: the loss equals a hand computation (full and top-k teacher, decoder and
classifier shapes, ignored positions), gradients reach only the student, the teacher runs
only on training forwards, the student moves towards the teacher, and the CLI writes a
loadable student checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.tiny_checkpoint import write_tiny_decoder

import lmforge
from lmforge.cli import main
from lmforge.compress.distill import TeacherSignal, TopK, distill_loss_sum
from lmforge.compress.short_fit import fit_on_tokens
from lmforge.models.decoder import Decoder, DecoderConfig, token_loss_sum
from lmforge.train.loop import TrainConfig
from lmforge.train.lr_schedule import SchedConfig
from lmforge.train.optim import OptimConfig

TEXT = Path("src/lmforge/data/corpora/tinyshakespeare.txt").read_text()[:30000]


def _by_hand(s, t, y, alpha, T, top_k=None) -> float:
    """The loss written out position by position in plain Python floats."""
    total = 0.0
    for srow, trow, target in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        if target == -100:
            continue
        ids = (
            sorted(range(len(trow)), key=lambda i: -trow[i])[:top_k] if top_k else range(len(trow))
        )
        zt = sum(math.exp(trow[i] / T) for i in ids)
        zs = sum(math.exp(v / T) for v in srow)
        kl = 0.0
        for i in ids:
            pt = math.exp(trow[i] / T) / zt
            kl += pt * (math.log(pt) - math.log(math.exp(srow[i] / T) / zs))
        ce = -math.log(math.exp(srow[target]) / sum(math.exp(v) for v in srow))
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize(("alpha", "T"), [(0.5, 2.0), (1.0, 1.0), (0.0, 4.0), (0.7, 0.5)])
def test_loss_equals_a_hand_computation(top_k: int | None, alpha: float, T: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g) * 2, torch.randn(2, 5, 7, generator=g) * 2
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = -100  # not scored: counts in neither term
    teacher = TopK(*t.topk(top_k, dim=-1)) if top_k else t
    loss, n = distill_loss_sum(s, teacher, y, alpha, T)
    assert n == 8
    expected = _by_hand(s.reshape(-1, 7), t.reshape(-1, 7), y.reshape(-1), alpha, T, top_k)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    if alpha == 0:  # no teacher term: the decoder's own next-token loss
        assert float(loss) == pytest.approx(float(token_loss_sum(s, y)[0]), rel=1e-6)


def test_classifier_logits_and_a_teacher_equal_to_the_student() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)  # (B, classes)
    y = torch.randint(0, 4, (6,), generator=g)
    loss, n = distill_loss_sum(s, t, y, 0.5, 3.0)
    assert n == 6 and float(loss) == pytest.approx(_by_hand(s, t, y, 0.5, 3.0), rel=1e-5)
    same, _ = distill_loss_sum(s, s.clone(), y, 1.0, 3.0)  # KL of a distribution with itself
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def _pair() -> tuple[Decoder, Decoder]:
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig(arch="llama", vocab_size=40, context_length=16, n_layer=2,
                                    n_head=2, d_model=32))  # fmt: skip
    student = Decoder(DecoderConfig(arch="llama", vocab_size=40, context_length=16, n_layer=1,
                                    n_head=2, d_model=16))  # fmt: skip
    return teacher, student


def test_gradients_reach_only_the_student_and_eval_runs_the_student_alone() -> None:
    teacher, student = _pair()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    signal = TeacherSignal(teacher, student, alpha=0.5, temperature=2.0)
    x = torch.randint(0, 40, (2, 8))
    student.train()
    loss, _ = signal.loss_fn(student(x), torch.randint(0, 40, (2, 8)))
    loss.backward()
    assert calls == [1]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student.eval()
    student(x)
    assert calls == [1]  # validation scores the student alone
    signal.remove()
    student.train()
    student(x)
    assert calls == [1]  # the hook is gone


@pytest.mark.parametrize("top_k", [None, 8])
def test_distillation_moves_the_student_towards_the_teacher(
    tmp_path: Path, top_k: int | None
) -> None:
    teacher, student = _pair()
    with torch.no_grad():  # a confident teacher: a random one is near uniform, like the student
        teacher.lm_head.weight.mul_(30)
    tokens = np.random.default_rng(0).integers(0, 40, 4000)
    x = torch.from_numpy(tokens[:64].reshape(4, 16))

    def kl() -> float:
        with torch.no_grad():
            return float(distill_loss_sum(student(x), teacher(x), torch.zeros_like(x), 1.0, 1.0)[0])

    before = kl()
    signal = TeacherSignal(teacher, student, alpha=1.0, temperature=1.0, top_k=top_k)
    train = TrainConfig(max_steps=40, batch_size=8, eval_every=40, save_every=40, log_every=10,
                        device="cpu")  # fmt: skip
    sched = SchedConfig(name="constant", warmup_steps=0)
    fit_on_tokens(student, tokens, tmp_path, train, OptimConfig(lr=1e-2), sched, 16,
                  loss_fn=signal.loss_fn)  # fmt: skip
    signal.remove()
    student.eval()
    assert kl() < 0.5 * before


def test_cli_writes_a_student_checkpoint_and_refuses_another_vocabulary(
    tmp_path: Path, capsys
) -> None:
    teacher = write_tiny_decoder(tmp_path / "teacher", TEXT, 300, 64)
    args = ["distill", f"--teacher={teacher}", "--max_eval_bytes=3000", "--train.max_steps=6",
            "--train.batch_size=2", "--sched.warmup_steps=1", "--student.n_layer=1",
            "--student.d_model=32", "--student.n_head=2", "--student.context_length=32"]  # fmt: skip
    assert main([*args, f"--out_dir={tmp_path / 'run'}", "--top_k=5"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    student, _, manifest = lmforge.load(tmp_path / "run")
    assert manifest.kind == "decoder"
    assert student.num_params() == summary["student_parameters"] < summary["teacher_parameters"]
    assert summary["steps"] == 6 and math.isfinite(summary["student_val_bpb"])
    capsys.readouterr()
    assert main([*args, f"--out_dir={tmp_path / 'bad'}", "--student.vocab_size=99"]) == 2
    assert "must equal the teacher's" in capsys.readouterr().err


def test_cli_distills_a_classifier_into_a_smaller_encoder(tmp_path: Path) -> None:
    from lmforge.data.classification import default_paths

    rows = default_paths()["train"].read_text().splitlines()
    train = tmp_path / "train.csv"
    train.write_text("\n".join(rows[:201]) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("\n".join(rows[:1] + rows[201:261]) + "\n")
    teacher = tmp_path / "teacher"
    assert main(["classify", "--config=tiny_random", "--tokenizer_vocab=300", "--model.n_layer=1",
                 "--model.d_model=32", "--model.n_head=2", "--train.batch_size=16",
                 "--train.max_steps=4", "--train.eval_every=4", "--train.save_every=4",
                 "--sched.warmup_steps=1", f"--data.train={train}", f"--data.test={test}",
                 f"--out_dir={teacher}"]) == 0  # fmt: skip
    assert main(["distill", f"--teacher={teacher}", "--student_encoder.n_layer=1",
                 "--student_encoder.d_model=16", "--student_encoder.n_head=2",
                 "--train.max_steps=4", "--train.batch_size=8", "--sched.warmup_steps=1",
                 f"--out_dir={tmp_path / 'student'}"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    student, _, manifest = lmforge.load(tmp_path / "student", expect="sequence-classifier")
    assert manifest.kind == "sequence-classifier" and summary["steps"] == 4
    assert summary["student_parameters"] < summary["teacher_parameters"]
    assert summary["test_data"] == str(test)  # the teacher's own test file
    assert 0 <= summary["student_accuracy"] <= 1 and 0 <= summary["teacher_f1_macro"] <= 1
