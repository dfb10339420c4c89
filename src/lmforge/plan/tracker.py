"""Measure the peak of live tensor bytes during training steps, and enforce a memory budget.

On CUDA the allocator counts (``torch.cuda.max_memory_allocated``); on CPU a
``TorchDispatchMode`` sees every tensor an op creates and a weak reference tells when its
storage dies (``torch.distributed._tools.mem_tracker.MemTracker``). Process RSS is useless for
this: it mostly shows what the C allocator keeps (shared/BENCHMARKING.md).

``BudgetTracker`` raises ``torch.OutOfMemoryError`` — the same type CUDA raises — as soon as live
bytes exceed a budget, so OOM recovery can be tested on a CPU.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")


class LiveTensorTracker(MemTracker):
    """``MemTracker`` that also works with frozen parameters (LoRA, QLoRA).

    torch 2.13's tracker registers a gradient hook on every parameter, which raises "cannot
    register a hook on a tensor that doesn't require gradient" for frozen ones; those never get
    a gradient, so they only need their own bytes tracked.
    """

    def _track_module_params_and_buffers(
        self, module: nn.Module, install_grad_hooks: bool = True
    ) -> tuple[int, int]:
        frozen = [p for p in module.parameters() if not p.requires_grad]
        param_memory = 0
        for p in frozen:
            winfos = self._update_and_maybe_create_winfos(p, _MemRefType.PARAM)
            param_memory += sum(w.mem_consumed for w in winfos)
        if not frozen:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        # track the trainable ones through the parent logic, on a view holding only them
        holder = _ParamHolder([p for p in module.parameters() if p.requires_grad], module)
        p_mem, b_mem = super()._track_module_params_and_buffers(holder, install_grad_hooks)
        return param_memory + p_mem, b_mem

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        # The root module runs once per micro-batch (gradient accumulation): forget its
        # per-module statistics instead of refusing, the global peak is all we report.
        name = self._mod_tracker.get_known_fqn(module)
        parents = set(self._mod_tracker.parents) - {name}
        if module in self.memory_tracking and not self._mod_tracker.is_bw and parents <= {"Global"}:
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def peak_bytes(self, device: torch.device | str = "cpu") -> int:
        snap = self.get_tracker_snapshot("peak").get(torch.device(device), {})
        return int(snap.get("Total", 0))

    def peak_breakdown(self, device: torch.device | str = "cpu") -> dict[str, int]:
        """Bytes by MemTracker category at the moment of the peak."""
        snap = self.get_tracker_snapshot("peak").get(torch.device(device), {})
        out = {str(getattr(k, "value", k)): int(v) for k, v in snap.items()}
        return {k: out.get(k, 0) for k in (*CATEGORIES, "Total")}

    def current_bytes(self, device: torch.device | str = "cpu") -> int:
        snap = self.get_tracker_snapshot("current").get(torch.device(device), {})
        return int(snap.get("Total", 0))


class _ParamHolder(nn.Module):
    """A module whose ``parameters()`` are the given ones and ``buffers()`` the source's."""

    def __init__(self, params: list[nn.Parameter], source: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_plist", params)
        object.__setattr__(self, "_source", source)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        return iter(self._plist)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        return self._source.buffers()


class BudgetTracker(TorchDispatchMode):
    """Raises ``torch.OutOfMemoryError`` when the bytes of tensors created under it exceed
    ``budget`` (CPU tests of OOM recovery), right after the op that crossed the line, as the
    CUDA allocator would. A plain dispatch mode: ``MemTracker``'s module hooks do not survive
    an exception in the middle of a forward or backward."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = int(budget)
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        res = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(res):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._seen or st.nbytes() == 0:
                continue
            nbytes = st.nbytes()
            self._seen[key] = weakref.ref(st)
            weakref.finalize(st, self._freed, key, nbytes)
            self.live += nbytes
        self.peak = max(self.peak, self.live)
        if self.live > self.budget:
            del res
            raise torch.OutOfMemoryError(
                f"live tensors {self.live:,} B exceed the budget {self.budget:,} B "
                "(lmforge BudgetTracker)"
            )
        return res


@contextlib.contextmanager
def track_peak(*external: Any, device: torch.device | str = "cpu") -> Iterator[dict[str, int]]:
    """``with track_peak(model, optimizer) as peak: step()`` → ``peak`` filled on exit with the
    bytes by category at the peak (``peak["Total"]``). CUDA: max_memory_allocated instead."""
    device = torch.device(device)
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["Total"] = torch.cuda.max_memory_allocated(device)
        return
    # Collect garbage cycles first: freed by a collection in the middle of the step, they gave
    # peaks 3-6 % low that depended on what the process ran before (measured: a DoRA step).
    gc.collect()
    tracker = LiveTensorTracker()
    tracker.track_external(*external)
    with tracker:
        yield result
    result.update(tracker.peak_breakdown(device))
