"""The memory estimator gives exactly the numbers it gave before its refactor.

``estimate_golden.json`` holds inputs → outputs recorded from the estimator as it was before it
was split into one function per component (commit 8a4546a): every component, phase, note and
field of ``estimate`` for ~400 workloads (all precisions, checkpointing modes, methods,
optimizers, LoRA targets, freeze options, attention kernels, devices, world sizes and ZeRO
stages, inference, and the loop practices of litgpt and torchtune), the hardware table, FLOPs
per token, auto-fit plans and ``lmforge estimate --json`` reports of the shipped configs. Any
drift — a byte, a phase name, a note — fails here with the case that moved.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from lmforge.cli import main
from lmforge.models.decoder import DecoderConfig
from lmforge.plan.autofit import plan_fit
from lmforge.plan.estimate import PeerPractice, Workload, estimate, fmt_bytes, parse_bytes
from lmforge.plan.hardware import flops_per_token, hardware_table
from lmforge.plan.workload import lora_terms

GOLDEN = json.loads((Path(__file__).parent / "estimate_golden.json").read_text())
MODELS = {name: DecoderConfig.model_validate(data) for name, data in GOLDEN["models"].items()}


def _workload(case: dict[str, Any]) -> Workload:
    """The case's workload: the recorded fields over the defaults."""
    own = dict(case["workload"])
    if "lora_targets" in own:
        own["lora_targets"] = tuple(own["lora_targets"])
    return Workload(**own)


def _peer(case: dict[str, Any]) -> PeerPractice:
    return PeerPractice(**case["peer"])


def _mismatches(cases: list[dict], compute) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for i, case in enumerate(cases):
        got = json.loads(json.dumps(compute(case)))  # tuples → lists, as recorded
        if got != case["result"]:
            want = case["result"]
            keys = sorted(set(got) | set(want)) if isinstance(got, dict) else []
            diff = {k: (want.get(k), got.get(k)) for k in keys if want.get(k) != got.get(k)}
            out.append(f"case {i} ({case['model']}, {case['workload']}, {case['peer']}): {diff}")
    return out


def test_every_component_of_every_estimate_is_unchanged() -> None:
    def compute(case: dict) -> dict:
        return estimate(MODELS[case["model"]], _workload(case), _peer(case)).to_dict()

    bad = _mismatches(GOLDEN["estimates"], compute)
    assert not bad, f"{len(bad)} of {len(GOLDEN['estimates'])} estimates drifted:\n" + "\n".join(
        bad[:5]
    )


def test_hardware_table_and_flops_are_unchanged() -> None:
    for case in GOLDEN["hardware"]:
        cfg = MODELS[case["model"]]
        rows = hardware_table(cfg, _workload(case), case["tokens"], case["mfu"], _peer(case))
        assert rows == case["rows"], case["model"]
    for case in GOLDEN["flops"]:
        got = flops_per_token(MODELS[case["model"]], case["seq"], case["checkpointing"])
        assert got == case["flops"], case


def test_auto_fit_plans_are_unchanged() -> None:
    def compute(case: dict) -> dict:
        return plan_fit(
            MODELS[case["model"]], _workload(case), parse_bytes(case["budget"]),
            case["global_batch"], allow=case["allow"], runnable=case["runnable"],
            peer=_peer(case),
        )  # fmt: skip

    bad = _mismatches(GOLDEN["plans"], compute)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "case", GOLDEN["cli"], ids=[" ".join(c["args"]) or "(no arguments)" for c in GOLDEN["cli"]]
)
def test_cli_reports_are_unchanged(case: dict, tmp_path: Path, capsys) -> None:
    if case.get("needs") and importlib.util.find_spec(case["needs"]) is None:
        pytest.skip(f"{case['needs']} is not installed")
    if case.get("hf"):
        (tmp_path / "config.json").write_text(json.dumps(case["hf"]))
    if case.get("yaml"):
        name = next(a for a in case["args"] if "yaml" in a).rsplit("/", 1)[1]
        (tmp_path / name).write_text(case["yaml"])
    args = [a.replace("{dir}", str(tmp_path)) for a in case["args"]]
    if not args:  # the CPU demo preset now says precision auto (host-dependent): pin the
        args = ["--train.precision=bf16-mixed"]  # precision it had when the file was written
    assert main(["estimate", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == case["report"]


def test_byte_helpers_and_lora_names_are_unchanged() -> None:
    assert {s: parse_bytes(s) for s in GOLDEN["parse_bytes"]} == GOLDEN["parse_bytes"]
    assert {n: fmt_bytes(float(n)) for n in GOLDEN["fmt_bytes"]} == GOLDEN["fmt_bytes"]
    got = {k: list(lora_terms(k.split(","))) for k in GOLDEN["lora_terms"]}
    assert got == GOLDEN["lora_terms"]
