"""The one batched generation engine: continuous batching over a shared KV cache.

``generate``, ``chat``, generation scoring (``generate.generate_batch``) and ``lmforge serve``
all decode through ``Engine``. Requests join and leave between decoding steps; each has its
own sampling settings, seed, stop strings, stop ids and token budget.

How rows share one cache: each active row holds one batch slot of a per-layer (slots,
n_kv_head, width, head_dim) cache, and all rows end at the same column ``ptr`` (a joining row is
right-aligned there: the layout of a left-padded batch). ``Decoder.forward``'s
``attention_mask`` gives each row its own positions and hides the columns before its ``start``,
so a row is computed as if alone (tests/inference/test_engine.py). Rows joining at one step are
prefilled together into their slots; a leaving row is replaced by the last slot (swap-remove),
so the active rows are the first ``n`` slots and a step touches only them. Unused columns are
dropped by shifting left ("compaction") when space is needed, or when every row can then start
at column 0: no mask is needed then, and a lone request takes ``generate_tokens``'s path.

Hand-written rather than vLLM/TGI: those are CUDA servers that do not load lmforge models;
this is the scheduler of a few hundred lines that the CPU and ``Decoder`` need. The forward
passes themselves are in ``fast_decode.py`` (decoding) and ``Decoder.forward`` (prefill).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from lmforge.eval.mode import eval_mode
from lmforge.generate import SampleConfig, StreamDecoder, process_logits
from lmforge.inference.fast_decode import DecodeWeights, prefill_logits
from lmforge.models.decoder import Decoder
from lmforge.models.layers import KVCache

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward: attention scores grow with its square (a 4k-token prompt
# at once: (9, 4096, 4096) fp32 scores, 600 MB per row for SmolLM2).
PREFILL_CHUNK = 512


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's ``max_queue`` allows (HTTP 429)."""


class PromptTooLong(ValueError):
    """prompt + max_tokens exceed the engine's ``max_len`` (HTTP 400)."""


@dataclass(frozen=True)
class Request:
    """One generation request. ``sample`` carries temperature, top_k, top_p, repetition
    penalty, seed and ``max_new_tokens``; ``stop`` strings end the text before them (never
    included); ``stop_ids`` end it at the token (not included); ``logprobs`` asks for the
    log-probability of every chosen token and of the ``logprobs`` likeliest alternatives."""

    prompt_ids: Sequence[int]
    sample: SampleConfig
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None


@dataclass
class TokenLogprob:
    """log p(token) under the model (before temperature/top-k/top-p) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """What one step adds to a request: new text (never a split UTF-8 character, never part of
    a stop string), the token ids drawn, and ``finish_reason`` ("stop", "length",
    "cancelled") on the last delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Completion:
    """The whole result of a request, as ``Engine.run`` returns it."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


class Handle:
    """A submitted request: ``cancel()`` stops its decoding at the next step."""

    def __init__(self, request: Request, on_delta: Callable[[Delta], None]) -> None:
        self.request, self.on_delta = request, on_delta
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.steps = 0  # tokens the engine drew for it (a cancelled request stops growing)
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    """An active request in a cache slot."""

    handle: Handle
    tokens: list[int]  # prompt + generated; the last one is not in the cache yet
    start: int  # the first cache column that is this row's
    generator: torch.Generator
    stream: StreamDecoder | None
    generated: int = 0
    text: str = ""  # decoded text so far (stop strings not yet cut)
    sent: int = 0  # characters of ``text`` already delivered
    pending_ids: list[int] = field(default_factory=list)
    pending_lp: list[TokenLogprob] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        """Cache columns this row may still write (one per step until its budget is spent)."""
        return self.handle.request.sample.max_new_tokens - self.generated


class Engine:
    """Continuous-batching decoder over ``model``; ``tokenizer`` (optional) turns tokens into
    streamed text and is needed for stop strings.

    ``max_batch`` rows decode together; ``max_queue`` requests may wait (more: ``QueueFull``);
    ``max_len`` cache columns per row (default the context; prompt + max_tokens must fit).
    ``fast_decode`` decodes with ``fast_decode.DecodeWeights`` (CPU: a transposed copy of the
    weights, ~1.4x faster steps at batch 1); False runs ``Decoder.forward`` in the model's own
    memory. The copy is taken here: build a new engine after changing the weights.
    Drive it from one thread: ``run`` (synchronous) or ``start`` (a background thread for a
    server); ``submit`` and ``Handle.cancel`` are thread-safe.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch ({max_batch}) >= 1 and max_queue ({max_queue}) >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        L = model.cfg.context_length
        self.max_len = min(L, max_len or L)
        self.device = next(model.parameters()).device
        self._fast = DecodeWeights.prepare(model) if fast_decode else None
        self._waiting: deque[Handle] = deque()
        self._lock = threading.Condition()
        self._rows: list[_Row] = []  # slot i holds _rows[i]
        self._caches: list[KVCache] = []
        self._width = 0  # allocated cache columns
        self.ptr = 0  # columns in use: every active row ends here
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_step: Callable[[int, int], None] | None = None  # (active rows, waiting) per step

    # ---- submitting ---------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raise ``PromptTooLong`` (or ValueError) unless ``request`` can ever run here."""
        n, budget = len(request.prompt_ids), request.sample.max_new_tokens
        if n == 0:
            raise ValueError("the prompt is empty: pass at least one token (the BOS id)")
        if n + budget > self.max_len:
            raise PromptTooLong(
                f"the prompt has {n} tokens and max_tokens is {budget}: together more than the "
                f"{self.max_len} tokens this model serves; shorten the prompt or lower max_tokens"
            )
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")

    def submit(self, request: Request, on_delta: Callable[[Delta], None]) -> Handle:
        """Queue ``request``; ``on_delta`` is called (from the engine's thread) with each Delta."""
        self.check(request)
        handle = Handle(request, on_delta)
        with self._lock:
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Decode ``requests`` to the end in this thread; results in request order."""
        assert self._thread is None, "run() on an engine whose background thread is running"
        results: list[list[Delta]] = [[] for _ in requests]
        for i, r in enumerate(requests):
            self.check(r)
            handle = Handle(r, results[i].append)
            self._waiting.append(handle)  # no QueueFull: the caller holds them all anyway
        self.drain()
        out = []
        for r, deltas in zip(requests, results, strict=True):
            lps = [lp for d in deltas for lp in d.logprobs or []]
            out.append(
                Completion(
                    [t for d in deltas for t in d.token_ids],
                    "".join(d.text for d in deltas),
                    deltas[-1].finish_reason or "length",
                    len(r.prompt_ids),
                    lps if r.logprobs is not None else None,
                )
            )
        return out

    def drain(self) -> None:
        """Step in this thread until every submitted request has finished."""
        while self._waiting or self._rows:
            self.step()

    # ---- the background thread (server) -------------------------------------------------------

    def start(self) -> None:
        """Decode in a daemon thread until ``stop()``. ``lmforge serve`` runs ``loop()`` on the
        main thread instead: torch ran ~1.5x slower from another thread (docs/serving.md)."""
        self._thread = threading.Thread(target=self.loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def loop(self) -> None:
        """Serve submitted requests in this thread until ``stop()`` is called (from another)."""
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._rows:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug or OOM must not leave clients waiting forever
                log.exception("the generation step failed; its requests end with 'error'")
                self._fail_all()

    def _fail_all(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting + [r.handle for r in self._rows]:
            self._finish_handle(h, Delta("", [], None, "error"))
        self._rows, self.ptr = [], 0

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones (prefilled together, each drawing its
        first token), then one decoding step for every active row."""
        with eval_mode(self.model, inference=True):
            self._drop_cancelled()
            self._admit()
            if self._rows:
                self._decode()
        if self.on_step is not None:
            self.on_step(len(self._rows), len(self._waiting))

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [h for h in self._waiting if h.cancelled.is_set()]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            self._finish_handle(h, Delta("", [], None, "cancelled"))
        for i in reversed(range(len(self._rows))):
            if self._rows[i].handle.cancelled.is_set():
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        joining: list[Handle] = []
        while len(self._rows) + len(joining) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting[0]
                lengths = [len(h.request.prompt_ids) for h in (*joining, handle)]
                # Columns still to write after joining: a new row's budget minus the token its
                # prefill draws, and every active row's remaining budget.
                ahead = max([h.request.sample.max_new_tokens - 1 for h in (*joining, handle)] +
                            [r.remaining for r in self._rows])  # fmt: skip
                compact = max(self.ptr, *lengths) + ahead > self.max_len
                unused = min((r.start for r in self._rows), default=self.ptr) if compact else 0
                need = max(self.ptr - unused, *lengths) + ahead
                if need > self.max_len:
                    break  # first come, first served: it waits until rows leave
                self._waiting.popleft()
            if compact:
                self._compact()
            joining.append(handle)
        if joining:
            self._prefill(joining)

    def _prefill(self, handles: list[Handle]) -> None:
        """Prefill the joining requests together (one forward per chunk, left-padded to the
        longest prompt, as transformers prefills a batch) and draw their first tokens."""
        prompts = [[int(t) for t in h.request.prompt_ids] for h in handles]
        k, P = len(prompts), max(map(len, prompts))
        # Columns are allocated as rows grow (``_decode``), not for the whole budget: a chat
        # request's default budget is the rest of the context, rarely used.
        self._reserve(max(self.ptr, P))
        if P > self.ptr:  # right-align the rows at the longest new prompt's end
            self._shift(P - self.ptr)
        s0 = len(self._rows)
        # Views of the new slots from the longest prompt's first column: the model writes
        # columns 0..P-1 of the views, which are columns ptr-P..ptr-1 of the caches.
        views = [KVCache(c.k[s0 : s0 + k, :, self.ptr - P :], c.v[s0 : s0 + k, :, self.ptr - P :])
                 for c in self._caches]  # fmt: skip
        ids = torch.zeros(k, P, dtype=torch.long, device=self.device)  # (k, P), left-padded
        real = torch.zeros(k, P, dtype=torch.bool, device=self.device)
        for j, p in enumerate(prompts):
            ids[j, P - len(p) :] = torch.tensor(p, device=self.device)
            real[j, P - len(p) :] = True
        mask = None if all(len(p) == P for p in prompts) else real
        for s in range(0, P, PREFILL_CHUNK):
            end = s + PREFILL_CHUNK
            m = None if mask is None else mask[:, :end]
            logits = prefill_logits(self.model, ids[:, s:end], s, views, m)  # (k, V)
        for h, p in zip(handles, prompts, strict=True):
            stream = None
            if self.tokenizer is not None:
                stream = StreamDecoder(self.tokenizer, context_ids=p)
            generator = torch.Generator(device=self.device).manual_seed(h.request.sample.seed)
            self._rows.append(_Row(h, p, self.ptr - len(p), generator, stream))
        greedy = logits.argmax(dim=-1).tolist()
        for j in reversed(range(k)):  # reversed: a finished row swaps in a later one
            self._take(s0 + j, logits[j], greedy[j])

    def _decode(self) -> None:
        rows, n = self._rows, len(self._rows)
        if min(r.start for r in rows) > 0 and len({r.start for r in rows}) == 1:
            self._compact()  # every row can start at 0: the unmasked path, as a request alone
        x = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (n, 1)
        mask = None
        if any(r.start for r in rows):
            cols = torch.arange(self.ptr + 1, device=self.device)
            starts = torch.tensor([r.start for r in rows], device=self.device)
            mask = cols[None, :] >= starts[:, None]  # (n, ptr + 1): False at the left padding
        self._reserve(self.ptr + 1)
        views = [KVCache(c.k[:n], c.v[:n]) for c in self._caches]
        if self._fast is not None:
            logits = self._fast.decode(x, self.ptr, views, mask)  # (n, V)
        else:
            logits = self.model(x, self.ptr, views, attention_mask=mask)[:, -1]
        self.ptr += 1
        greedy = logits.argmax(dim=-1).tolist()  # one sync for every greedy row
        for i in reversed(range(n)):  # reversed: a finished row swaps in a later one
            self._take(i, logits[i], greedy[i])

    def _take(self, i: int, logits: torch.Tensor, argmax: int) -> None:
        """Draw row i's next token from its logits (V,) (``argmax``: their argmax), deliver
        it, finish the row if done."""
        row = self._rows[i]
        r = row.handle.request
        cfg = r.sample
        row.handle.steps += 1
        x = logits[None]  # (1, V)
        if cfg.temperature == 0 and cfg.repetition_penalty == 1.0:
            token = argmax
        else:
            seen = torch.tensor([row.tokens], device=self.device)
            x = process_logits(x, cfg, seen if cfg.repetition_penalty != 1.0 else None)
            if cfg.temperature == 0:
                token = int(x.argmax(dim=-1))
            else:
                probs = x.softmax(dim=-1)
                token = int(torch.multinomial(probs, 1, generator=row.generator))
        row.generated += 1
        if token in r.stop_ids:
            self._finish(i, "stop")
            return
        row.tokens.append(token)
        row.pending_ids.append(token)
        if r.logprobs is not None:
            lp = logits.float().log_softmax(dim=-1)
            top = torch.topk(lp, min(r.logprobs, lp.numel()))
            alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            row.pending_lp.append(TokenLogprob(token, float(lp[token]), alts))
        if row.stream is not None:
            row.text += row.stream.push(token)
            if self._cut_at_stop(row):
                self._finish(i, "stop", flush=False)  # the text ends before the stop string
                return
        if row.remaining == 0:
            self._finish(i, "length")
            return
        self._deliver(row)

    def _cut_at_stop(self, row: _Row) -> bool:
        """Cut ``row.text`` before the first stop string in it; True if one was found."""
        hits = [i for s in row.handle.request.stop if (i := row.text.find(s)) >= 0]
        if hits:
            row.text = row.text[: min(hits)]
            return True
        return False

    def _deliver(self, row: _Row, finish: str | None = None) -> None:
        """Send the text and ids not sent yet; before the end, a tail of the text that may be
        the start of a stop string is held back."""
        end = len(row.text)
        if finish is None:
            for s in row.handle.request.stop:
                k = next((k for k in range(min(len(s) - 1, end - row.sent), 0, -1)
                          if row.text.endswith(s[:k])), 0)  # fmt: skip
                end = min(end, len(row.text) - k)
        text = row.text[row.sent : end]
        if not text and not row.pending_ids and finish is None:
            return
        row.sent = max(row.sent, end)
        lps = row.pending_lp if row.handle.request.logprobs is not None else None
        delta = Delta(text, row.pending_ids, lps, finish)
        row.pending_ids, row.pending_lp = [], []
        row.handle.on_delta(delta)

    def _finish(self, i: int, reason: str, flush: bool = True) -> None:
        row = self._rows[i]
        if flush and row.stream is not None:
            row.text += row.stream.flush()  # an unfinished character at the budget's end
            self._cut_at_stop(row)
        if reason == "cancelled":
            row.pending_ids, row.text = [], row.text[: row.sent]
        self._deliver(row, finish=reason)
        row.handle.done.set()
        last = len(self._rows) - 1
        if i != last:  # swap-remove: the active rows stay the first slots
            for c in self._caches:
                c.k[i, :, : self.ptr] = c.k[last, :, : self.ptr]
                c.v[i, :, : self.ptr] = c.v[last, :, : self.ptr]
            self._rows[i] = self._rows[last]
        self._rows.pop()
        if not self._rows:
            self.ptr = 0

    def _finish_handle(self, handle: Handle, delta: Delta) -> None:
        handle.on_delta(delta)
        handle.done.set()

    # ---- cache layout -------------------------------------------------------------------------

    def _reserve(self, columns: int) -> None:
        """Grow every layer's cache to at least ``columns`` (doubling, up to ``max_len``): a
        copy now and then instead of every row's whole budget allocated up front."""
        if self._caches and columns <= self._width:
            return
        width = min(self.max_len, max(columns, 2 * self._width, 64))
        new = self.model.new_kv_caches(self.max_batch, max_len=width)
        n = len(self._rows)
        for old, c in zip(self._caches, new, strict=False):
            c.k[:n, :, : self.ptr] = old.k[:n, :, : self.ptr]
            c.v[:n, :, : self.ptr] = old.v[:n, :, : self.ptr]
        self._caches, self._width = new, width

    def _compact(self) -> None:
        """Shift every row left by the columns no active row uses."""
        m = min((r.start for r in self._rows), default=self.ptr)
        if m == 0:
            return
        n, keep = len(self._rows), self.ptr - m
        for c in self._caches:
            c.k[:n, :, :keep] = c.k[:n, :, m : self.ptr].clone()  # clone: the ranges overlap
            c.v[:n, :, :keep] = c.v[:n, :, m : self.ptr].clone()
        for r in self._rows:
            r.start -= m
        self.ptr = keep

    def _shift(self, d: int) -> None:
        """Shift every row right by ``d`` columns (a longer prompt joins)."""
        n = len(self._rows)
        for c in self._caches:
            c.k[:n, :, d : d + self.ptr] = c.k[:n, :, : self.ptr].clone()
            c.v[:n, :, d : d + self.ptr] = c.v[:n, :, : self.ptr].clone()
        for r in self._rows:
            r.start += d
        self.ptr += d
