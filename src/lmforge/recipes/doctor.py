"""``lmforge doctor RUN_DIR``: what went wrong in a training run, with evidence and remedies.

    lmforge doctor runs/pretrain-20261203-1200            # findings, and RUN_DIR/doctor.md
    lmforge doctor runs/pretrain-20261203-1200 --json     # a JSON list: kind, severity, ...

Per-layer findings (vanishing gradients, update sizes, dead units) need a run trained with
``--train.log_layer_stats=true``.
"""

from __future__ import annotations

import json
import warnings

from pydantic import Field

from lmforge.config import Section
from lmforge.diagnose.doctor import Finding, diagnose, write_report

with warnings.catch_warnings():  # `--json` is the contract's flag; BaseModel.json is deprecated
    warnings.filterwarnings("ignore", message='Field name "json"')

    class DoctorConfig(Section):
        run_dir: str = Field(description="the run folder (holds metrics.jsonl)")
        json: bool = Field(False, description="print the findings as a JSON list")


def doctor(cfg: DoctorConfig) -> list[Finding]:
    """Diagnose ``cfg.run_dir``, write its doctor.md and print the findings."""
    findings = diagnose(cfg.run_dir)
    report = write_report(cfg.run_dir, findings)
    if cfg.json:
        print(json.dumps([f.to_dict() for f in findings], indent=1))
        return findings
    if not findings:
        print(f"{cfg.run_dir}: no problems found")
    for f in findings:
        print(f"[{f.severity}] {f.kind}: {f.evidence}\n    → {f.remedy}")
    print(f"report: {report}")
    return findings
