"""Reading a ``torch.distributed.checkpoint`` folder (sharded optimizer state) without
running code from it.

``torch.distributed.checkpoint.load`` unpickles ``.metadata`` with plain ``pickle.load`` and
every non-tensor value with ``torch.load(weights_only=False)``: a crafted checkpoint runs
whatever it likes on ``--resume``, even in one process. Here the metadata goes through an
unpickler that builds only the checkpoint-metadata classes, sizes and dtypes, and the values
through ``torch.load(weights_only=True)``; anything else is a ``CheckpointError`` naming the
file. Tensors were already read with ``weights_only=True`` by torch's own reader.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from lmforge.checkpoint.store import untrusted
from lmforge.errors import CheckpointError

# What a DCP ``.metadata`` pickle may name (found by unpickling the files torch 2.x writes).
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_META, "Metadata"),
    (_META, "MetadataIndex"),
    (_META, "StorageMeta"),
    (_META, "TensorStorageMetadata"),
    (_META, "BytesStorageMetadata"),
    (_META, "ChunkStorageMetadata"),
    (_META, "TensorProperties"),
    (_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name ("torch.strided")
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: Path) -> Metadata:
    """A DCP ``.metadata`` file, built from the allowed classes only; its shard files must be
    plain names inside the same folder."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # any failure to build it means the file is not one torch wrote
        raise untrusted(path, e) from None
    if not isinstance(metadata, Metadata):
        raise untrusted(path, f"holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise untrusted(path, f"names a shard outside its folder: {rel!r}")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata step uses ``read_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``weights_only=True``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self._folder = folder

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise untrusted(self._folder, f"value {read_item.dest_index.fqn}:\n{e}") from None
        # the same placement as DefaultLoadPlanner.load_bytes, with the safely loaded value
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def load_sharded(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load(state, folder)`` with the safe reader and planner. Errors inside DCP come
    wrapped in its ``CheckpointException``; ours are re-raised as they are."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata(folder / ".metadata")  # fail here, unwrapped, before DCP starts its steps
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner(folder))
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise
