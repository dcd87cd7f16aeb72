"""``GenerationEngine``: the thread that runs every generation on the resident model.

Continuous batching: requests wait in a bounded queue; between two decode steps the engine admits
waiting requests while the batch has rows and token budget left (each request reserves
``prompt + max_new_tokens`` tokens, and the key/value cache holds every row at the length of the
longest: the rows times the longest reservation stay within ``max_batch_tokens``) and its adapter
can get a device slot,
prefills them together, and merges them into the running batch (:mod:`app.serving.kv`); every
step then decodes one token for every running row, each row with its own adapter slot and
sampling settings. Finished, stopped and cancelled rows leave after the step that ends them.

The API talks to the engine through :meth:`GenerationEngine.submit`, which returns a
:class:`RequestHandle`: the engine pushes stream deltas (streaming requests only) and one final
:class:`GenerationResult` or error into it; ``cancel()`` stops the request at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from adapters_core.serving import SlottedModel
from app.serving.bank import AdapterBank, AdapterLease
from app.serving.errors import (
    NonFiniteScores,
    QueueFull,
    RequestTooLarge,
    ServingError,
    ServingUnavailable,
)
from app.serving.kv import BatchKV, append_step, concat, new_cache, select
from app.serving.sampling import RowSampling, SamplingParams, sample
from app.serving.text import TextTracker

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _settle(future: Future[T], fn: Callable[[], T]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)


@dataclass(frozen=True)
class EngineLimits:
    """Capacity of the engine."""

    max_batch_size: int = 64
    max_batch_tokens: int = 8192
    max_queue_depth: int = 256
    max_context: int | None = None


@dataclass
class GenerationResult:
    """The complete answer to one prompt."""

    text: str
    finish_reason: str  # "stop" (end of sequence or stop string), "length", or "cancelled"
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_tokens: int
    adapter: str | None
    time_to_first_token: float | None = None


@dataclass
class StreamDelta:
    """New output of a streaming request since its previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


class EngineMetrics:
    """What the engine reports; no-ops by default (the app wires Prometheus in)."""

    def queued(self, depth: int) -> None: ...
    def running(self, rows: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, adapter: str | None, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class RequestHandle:
    """The caller's side of one request: deltas (if streaming), then a result or an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, stream: bool) -> None:
        self.stream = stream
        self._loop = loop
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[Any] | None = None if loop is not None else queue.SimpleQueue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request at the next step (a client went away)."""
        self._cancelled.set()

    def deliver(self, item: StreamDelta | GenerationResult | BaseException) -> None:
        """Engine side: push ``item`` to the caller (thread-safe)."""
        if self._async is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody to tell
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        elif self._sync is not None:
            self._sync.put(item)

    async def events(self) -> AsyncIterator[StreamDelta | GenerationResult]:
        """Deltas then the result; an engine error is raised. Deltas that piled up while the caller was
        busy come as one (a slow consumer gets fewer, larger events, never a backlog)."""
        assert self._async is not None, "events() needs a handle made with an event loop"
        while True:
            items = [await self._async.get()]
            while not self._async.empty():
                items.append(self._async.get_nowait())
            for item in _coalesce(items):
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return

    async def result(self) -> GenerationResult:
        async for item in self.events():
            if isinstance(item, GenerationResult):
                return item
        raise ServingUnavailable("the engine ended without an answer")  # pragma: no cover

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Blocking wait for the result (handles made without a loop)."""
        assert self._sync is not None, "wait() needs a handle made without an event loop"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self._sync.get(timeout=left)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                return item


def _coalesce(items: list[Any]) -> list[Any]:
    """Merge consecutive :class:`StreamDelta` items into one."""
    out: list[Any] = []
    for item in items:
        last = out[-1] if out else None
        if isinstance(item, StreamDelta) and isinstance(last, StreamDelta):
            out[-1] = StreamDelta(
                last.text + item.text, last.token_ids + item.token_ids,
                None if last.logprobs is None or item.logprobs is None else last.logprobs + item.logprobs,
                None if last.top_logprobs is None or item.top_logprobs is None else last.top_logprobs + item.top_logprobs,
            )
        else:
            out.append(item)
    return out


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    lease: AdapterLease | None
    handle: RequestHandle
    adapter: str | None
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def reserved(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(eq=False)
class _Row:
    """A request in the running batch."""

    request: _Request
    slot: int
    generator: torch.Generator | None
    text: TextTracker | None
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    streamed_tokens: int = 0
    last_token: int = 0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    finish_reason: str | None = None
    error: ServingError | None = None  # answered instead of a result when the row retires


class GenerationEngine:
    """Runs generation for every request on one resident model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, slotted: SlottedModel, bank: AdapterBank,
                 limits: EngineLimits, *, eos_ids: Sequence[int], metrics: EngineMetrics | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.slotted = slotted
        self.bank = bank
        self.limits = limits
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.metrics = metrics or EngineMetrics()
        self.device = slotted.device
        # the id padding positions hold (masked, so any id the embeddings have: a tokenizer's pad token may
        # have been added without resizing them)
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        rows = int(embeddings.weight.shape[0])
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = next((int(i) for i in (pad, *self.eos_ids) if i is not None and 0 <= int(i) < rows), 0)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._kv: BatchKV | None = None
        self._thread: threading.Thread | None = None
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._accepting = False
        self._stopping = False
        self.peak_rows = 0
        """The largest running batch so far (rows decoded together in one step)."""
        self._sweep_failure_logged = -60.0

    # ------------------------------------------------------------------ lifecycle
    def _warm_up(self) -> None:
        """One short generation on the base model before taking requests: the first forward pays one-off
        kernel and allocator set-up (~0.2 s on CPU) that a user should not."""
        ids = torch.tensor([[self._pad_id] * 4], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        cache = new_cache()
        self._forward(ids, mask, (mask.cumsum(dim=1) - 1), cache, [0], last_only=True)
        step = torch.ones((1, 5), dtype=torch.long, device=self.device)
        self._forward(ids[:, :1], step, torch.tensor([[4]], device=self.device), cache, [0], last_only=False)

    def start(self) -> None:
        """Run the engine on a new thread; returns once it has warmed up and takes requests."""
        ready = threading.Event()
        threading.Thread(target=self.run, args=(ready.set,), name="adapterforge-generation", daemon=True).start()
        ready.wait()

    def run(self, on_ready: Callable[[], object] | None = None) -> None:
        """Run the engine on the calling thread until :meth:`stop` (``on_ready()`` once it takes requests).

        On CPUs every parallel torch operation of the process should run on this thread: as soon as a
        second thread has run one, libgomp counts more OpenMP threads than cores and stops spinning
        between parallel regions, which halves the engine's throughput for the rest of the process
        (measured: 3.8 ms → 7.5 ms per decode step). :meth:`call` runs work here for that reason.
        """
        with self._cond:
            self._thread = threading.current_thread()
            self._accepting, self._stopping = True, False
        self._loop(on_ready or (lambda: None))

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between two steps; its result (or error) comes in the future."""
        future: Future[T] = Future()
        if threading.current_thread() is self._thread:
            _settle(future, fn)
            return future
        with self._cond:
            if not self._accepting:
                raise ServingUnavailable("the generation engine is not running")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, deque()
        for fn, future in calls:
            _settle(future, fn)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the ones in flight with 503, and end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and takes requests."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ submission (any thread)
    def check_request(self, prompt_tokens: int, params: SamplingParams, *, prompt_param: str = "prompt",
                      length_param: str = "max_new_tokens") -> None:
        """Raise :class:`RequestTooLarge` for a prompt the engine could never run, naming the request's field at
        fault: ``prompt_param`` when the prompt leaves no room for one new token, else ``length_param``."""
        if prompt_tokens == 0:
            raise RequestTooLarge(f"{prompt_param} is empty after tokenization", param=prompt_param)
        new = params.max_new_tokens
        for limit, what in ((self.limits.max_context, "the model's context length"),
                            (self.limits.max_batch_tokens, "this server's max_batch_tokens")):
            if limit is None or prompt_tokens + new <= limit:
                continue
            if prompt_tokens >= limit:
                raise RequestTooLarge(
                    f"{prompt_param} has {prompt_tokens} tokens, which leaves no room for a single new token within "
                    f"{what} of {limit}", param=prompt_param)
            raise RequestTooLarge(
                f"{prompt_param} has {prompt_tokens} tokens and {length_param} is {new}: together "
                f"{prompt_tokens + new}, above {what} of {limit} (at most {limit - prompt_tokens} new tokens fit)",
                param=length_param)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, lease: AdapterLease | None = None,
               loop: asyncio.AbstractEventLoop | None = None, stream: bool = False) -> RequestHandle:
        """Queue one prompt; the caller keeps ``lease`` released on error (the engine releases it once queued)."""
        return self.submit_all([(prompt_ids, params, lease)], loop=loop, stream=stream)[0]

    def submit_all(self, prompts: Sequence[tuple[Sequence[int], SamplingParams, AdapterLease | None]], *,
                   loop: asyncio.AbstractEventLoop | None = None, stream: bool = False) -> list[RequestHandle]:
        """Queue the prompts of one API request, all of them or none (:class:`QueueFull` when they do not all fit
        in the queue): a refused request leaves nothing behind to cancel. The caller keeps the leases released
        on error (the engine releases each once queued)."""
        for prompt_ids, params, _ in prompts:
            self.check_request(len(prompt_ids), params)
        handles = [RequestHandle(loop, stream) for _ in prompts]
        requests = [_Request(list(prompt_ids), params, lease, handle, lease.ref if lease is not None else None)
                    for (prompt_ids, params, lease), handle in zip(prompts, handles, strict=True)]
        with self._cond:
            self._check_room(len(requests))
            self._waiting.extend(requests)
            self.metrics.queued(len(self._waiting))
            self._cond.notify()
        return handles

    def check_room(self, count: int) -> None:
        """Raise :class:`QueueFull` (429) or :class:`ServingUnavailable` (503) if ``count`` generations could not be
        queued now: the API asks before it reads an adapter for them (a refused request then costs nothing);
        :meth:`submit_all` asks again, and decides."""
        with self._cond:
            self._check_room(count)

    def _check_room(self, count: int) -> None:
        if not self._accepting:
            raise ServingUnavailable("the generation engine is not running")
        waiting = len(self._waiting)
        if waiting + count > self.limits.max_queue_depth:
            more = f"; this request's {count} generations do not fit" if count > 1 else ""
            raise QueueFull(
                f"{waiting} generation requests are already waiting (ADAPTERFORGE_MAX_QUEUE_DEPTH){more}; retry shortly"
            )

    # ------------------------------------------------------------------ the loop (engine thread)
    def _loop(self, on_ready: Callable[[], object]) -> None:
        torch.set_grad_enabled(False)
        try:
            self._warm_up()
        except Exception:
            logger.exception("warm-up forward failed")
        finally:
            on_ready()
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._rows and not self._calls:
                        self._cond.wait(timeout=1.0)
                        self._idle_sweep()
                    if self._stopping:
                        break
                try:
                    with self.slotted.structure_lock:  # request threads wrap modules for new adapters between steps
                        self._step()
                except Exception as exc:
                    logger.exception("generation step failed; failing the requests of the batch")
                    self._fail_rows(ServingError(f"generation failed: {exc.__class__.__name__}: {exc}"))
        except BaseException:  # (a bug of ours): no request may wait for an engine that is gone
            logger.exception("the generation engine stopped on an unexpected error")
            raise
        finally:
            with self._cond:
                self._accepting = False
            self._shutdown()

    def _idle_sweep(self) -> None:
        """Clear the slots of deleted versions while no request runs (called holding ``_cond``); a failure is
        logged and tried again later, never the end of the engine."""
        if not self.slotted.structure_lock.acquire(blocking=False):  # never hold up submit() (which needs _cond)
            return                                                   # behind a wrapping
        try:
            self._sweep()
        finally:
            self.slotted.structure_lock.release()

    def _sweep(self) -> None:
        """Clear the slots of deleted versions (:meth:`AdapterBank.sweep`). A failure is logged (once a minute at
        most) and the slot tried again later; the step goes on: requests on other adapters still run."""
        try:
            self.bank.sweep()
        except Exception:
            now = time.monotonic()
            if now - self._sweep_failure_logged >= 60.0:
                self._sweep_failure_logged = now
                logger.exception("clearing the slots of deleted adapter versions failed; trying again later")

    def _step(self) -> None:
        self._run_calls()
        self._sweep()
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._decode()

    def _shutdown(self) -> None:
        error = ServingUnavailable("the server is shutting down")
        self._fail_rows(error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = self._calls, deque()
        for _, future in calls:
            future.set_exception(error)
        for request in waiting:
            self._release(request)
            self.metrics.finished(request.adapter, "error", 0, 0)  # (never prefilled: no prompt tokens read)
            request.handle.deliver(error)

    def _release(self, request: _Request) -> None:
        if request.lease is not None:
            self.bank.release(request.lease)

    def _fail_rows(self, error: BaseException) -> None:
        """Fail every running row (after a failed decode step the batch's cache cannot be trusted)."""
        rows, self._rows, self._kv = self._rows, [], None
        self._fail(rows, error, prefilled=True)
        self.metrics.running(0)

    def _fail(self, rows: list[_Row], error: BaseException, *, prefilled: bool) -> None:
        """Answer ``rows`` with ``error``, counted as generations ended by an error (with their prompt tokens
        where a prefill read them, and the tokens generated before)."""
        for row in rows:
            self._release(row.request)
            prompt = len(row.request.prompt_ids) if prefilled else 0
            self.metrics.finished(row.request.adapter, "error", prompt, len(row.generated))
            row.request.handle.deliver(error)

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(r.handle.cancelled for r in self._waiting):
                kept: deque[_Request] = deque()
                for request in self._waiting:
                    if request.handle.cancelled:  # answered like a cancelled running row, with nothing generated
                        self._release(request)
                        self.metrics.finished(request.adapter, "cancelled", 0, 0)  # (its prompt was never read)
                        request.handle.deliver(GenerationResult(
                            text="", finish_reason="cancelled", token_ids=[],
                            logprobs=[] if request.params.logprobs else None,
                            top_logprobs=[] if request.params.top_logprobs else None,
                            prompt_tokens=len(request.prompt_ids), adapter=request.adapter, time_to_first_token=None,
                        ))
                    else:
                        kept.append(request)
                self._waiting = kept
                self.metrics.queued(len(kept))
        cancelled = [i for i, row in enumerate(self._rows) if row.request.handle.cancelled]
        for i in cancelled:
            self._rows[i].finish_reason = "cancelled"
        if cancelled:
            self._retire()

    def _admit(self) -> list[_Row]:
        """Waiting requests that fit the batch now, in arrival order. Those whose adapter gets no slot
        (every slot runs rows) are passed over, the others keep their place; but each such adapter has a
        slot drained for it (the bank's ``drain_candidate``), so a stream of requests on the adapters in
        the slots never overtakes it for ever: a later request on a draining slot's adapter joins only if
        it ends no later than the rows already on that slot (its ``max_new_tokens`` within their longest
        remaining budget), so the slot still frees by then, and rows on one adapter still batch together."""
        admitted: list[_Row] = []
        rows_left = self.limits.max_batch_size - len(self._rows)
        # the key/value cache holds every row at the batch's length (padded on the left), which is at most the
        # longest reservation (prompt + max_new_tokens) among the running rows: rows x that must stay within
        # max_batch_tokens, not just the sum of the reservations
        rows = len(self._rows)
        longest = max((r.request.reserved for r in self._rows), default=0)
        draining: set[int] = set()  # slots freeing for older requests
        blocked: set[str] = set()  # adapter versions waiting for a slot (one drained slot each)
        horizon: dict[int, int] = {}  # by slot: the steps its rows may still take (once a slot drains)
        with self._cond:
            kept: deque[_Request] = deque()
            while self._waiting:
                request = self._waiting.popleft()
                if rows_left <= 0 or (rows + 1) * max(longest, request.reserved) > self.limits.max_batch_tokens:
                    kept.append(request)
                    kept.extend(self._waiting)
                    self._waiting.clear()
                    break
                slot = 0
                if request.lease is not None:
                    entry = request.lease.entry  # (its slot changes on this thread only)
                    if (entry.slot is not None and entry.slot in draining
                            and request.params.max_new_tokens > horizon[entry.slot]):
                        kept.append(request)  # it would hold the slot longer: behind the request it frees for
                        continue
                    try:
                        acquired = self.bank.acquire(request.lease)
                    except Exception as exc:  # NoFreeSlot, or a slot copy that failed: answer, never drop
                        if not isinstance(exc, ServingError):
                            logger.exception("loading adapter %s into a slot failed", request.adapter)
                            exc = ServingError(f"loading adapter {request.adapter} failed: {exc}")
                        self._release(request)
                        self.metrics.finished(request.adapter, "error", 0, 0)
                        request.handle.deliver(exc)
                        continue
                    if acquired is None:
                        if entry.key not in blocked:
                            blocked.add(entry.key)
                            victim = self.bank.drain_candidate(draining)
                            if victim is not None:
                                if not draining:  # the first: what the running and admitted rows have left
                                    for row in (*self._rows, *admitted):
                                        left = row.request.params.max_new_tokens - len(row.generated)
                                        horizon[row.slot] = max(horizon.get(row.slot, 0), left)
                                draining.add(victim)
                                horizon.setdefault(victim, 0)
                        kept.append(request)
                        continue
                    slot = acquired
                    if draining:
                        horizon[slot] = max(horizon.get(slot, 0), request.params.max_new_tokens)
                params = request.params
                try:
                    tracker = None  # read at every step only where needed; otherwise once, when answered
                    if request.handle.stream or params.stop:
                        tracker = TextTracker(self.tokenizer, request.prompt_ids, params.stop)
                    row = _Row(request, slot, params.generator(self.device), tracker)
                except Exception as exc:  # this request fails alone; the queue and its slot's count stay right
                    logger.exception("could not start a request on %s", request.adapter or "the base model")
                    self._release(request)
                    self.metrics.finished(request.adapter, "error", 0, 0)
                    request.handle.deliver(ServingError(f"generation failed: {exc.__class__.__name__}: {exc}"))
                    continue
                admitted.append(row)
                rows_left -= 1
                rows += 1
                longest = max(longest, request.reserved)
            self._waiting = kept
            self.metrics.queued(len(kept))
        return admitted

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 slots: list[int], *, last_only: bool) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if last_only and self._keep_logits:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), self.slotted.route(slots):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _prefill(self, new: list[_Row]) -> None:
        try:
            logits, kv = self._prefilled(new)
            joined = kv if self._kv is None else concat(self._kv, kv)
        except Exception as exc:  # the running rows' cache is untouched (concat makes a new one): only the new rows fail
            logger.exception("prefill of %d requests failed", len(new))
            self._fail(new, ServingError(f"generation failed: {exc.__class__.__name__}: {exc}"), prefilled=False)
            return
        self._kv = joined
        self._rows.extend(new)
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self.metrics.running(len(self._rows))
        self._take_tokens(logits, new)

    def _prefilled(self, new: list[_Row]) -> tuple[torch.Tensor, BatchKV]:
        """One forward over the new rows' prompts (padded on the left): their last logits and their cache."""
        lengths = [len(r.request.prompt_ids) for r in new]
        width = max(lengths)
        ids = torch.full((len(new), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, row in enumerate(new):
            n = lengths[i]
            ids[i, width - n:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = new_cache()
        logits = self._forward(ids, mask, positions, cache, [r.slot for r in new], last_only=True)
        return logits, BatchKV(cache, mask, torch.tensor(lengths, dtype=torch.long, device=self.device))

    def _decode(self) -> None:
        kv = self._kv
        assert kv is not None
        rows = self._rows
        mask = append_step(kv)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        slots = [r.slot for r in rows]
        self.slotted.sync_rows(slots)
        logits = self._forward(ids, mask, kv.positions.unsqueeze(1), kv.cache, slots, last_only=False)
        kv.positions = kv.positions + 1
        self._take_tokens(logits, rows)

    def _take_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Sample one token for each of ``rows`` (the rows of ``logits``), then retire finished rows."""
        sampled = sample(logits, [RowSampling(r.request.params, r.generator, len(r.generated)) for r in rows],
                         self.eos_ids)
        now = time.perf_counter()
        for i, row in enumerate(rows):
            if i in sampled.failed:  # this row only: the others' logits and cache rows are their own
                row.error = _non_finite(row)
                row.finish_reason = "error"
                continue
            token = sampled.tokens[i]
            row.generated.append(token)
            row.last_token = token
            if sampled.logprobs is not None and row.request.params.logprobs:
                row.logprobs.append(sampled.logprobs[i])
            if sampled.top is not None and row.request.params.top_logprobs:
                row.top.append(sampled.top[i])
            if row.first_token_at is None:
                row.first_token_at = now
                self.metrics.first_token(now - row.request.submitted)
            else:
                self.metrics.next_token(now - row.last_token_at)
            row.last_token_at = now
            self._check_finished(row, token)
            if row.request.handle.stream:
                self._stream(row)
        if any(r.finish_reason for r in rows):
            self._retire()

    def _check_finished(self, row: _Row, token: int) -> None:
        if row.text is not None:
            row.text.update(row.generated)
        if (row.text is not None and row.text.stopped) or token in self.eos_ids:  # the sampler masks EOS
            row.finish_reason = "stop"  # while min_new_tokens forbids it
        elif len(row.generated) >= row.request.params.max_new_tokens:
            row.finish_reason = "length"

    def _stream(self, row: _Row) -> None:
        if row.finish_reason:
            return  # the final result carries the rest
        assert row.text is not None
        text = row.text.delta(final=False)
        new_tokens = row.generated[row.streamed_tokens:]
        if not text and not new_tokens:
            return
        params = row.request.params
        delta = StreamDelta(
            text, new_tokens,
            row.logprobs[row.streamed_tokens:] if params.logprobs else None,
            row.top[row.streamed_tokens:] if params.top_logprobs else None,
        )
        row.streamed_tokens = len(row.generated)
        row.request.handle.deliver(delta)

    def _retire(self) -> None:
        """Answer and remove the rows that finished. The last running rows move into the holes, so every
        other row keeps its position (and its per-row adapter buffers, see ``SlottedModel.sync_rows``)."""
        keep = _fill_holes([bool(r.finish_reason) for r in self._rows])
        done = [r for r in self._rows if r.finish_reason]
        for row in done:
            self._answer(row)
        if self._kv is not None:
            self._kv = select(self._kv, keep) if keep else None
        self._rows = [self._rows[i] for i in keep]
        self.metrics.running(len(self._rows))

    def _answer(self, row: _Row) -> None:
        request = row.request
        self._release(request)
        if row.error is not None:
            logger.error("request on %s failed: %s", request.adapter or "the base model", row.error)
            self.metrics.finished(request.adapter, "error", len(request.prompt_ids), len(row.generated))
            request.handle.deliver(row.error)
            return
        params = request.params
        reason = row.finish_reason or "length"
        if row.text is None:  # read once now, the way a stream reads it (text after the prompt's)
            row.text = TextTracker(self.tokenizer, request.prompt_ids)
            row.text.update(row.generated)
        text = row.text.finish()
        if reason == "length" and row.text.stopped:  # the last ids, read only now, completed a stop string
            reason = "stop"
        if request.handle.stream and reason != "cancelled":
            tail = row.text.delta(final=True)
            new_tokens = row.generated[row.streamed_tokens:]
            if tail or new_tokens:
                request.handle.deliver(StreamDelta(
                    tail, new_tokens,
                    row.logprobs[row.streamed_tokens:] if params.logprobs else None,
                    row.top[row.streamed_tokens:] if params.top_logprobs else None,
                ))
        ttft = None if row.first_token_at is None else row.first_token_at - request.submitted
        self.metrics.finished(request.adapter, reason, len(request.prompt_ids), len(row.generated))
        request.handle.deliver(GenerationResult(
            text=text, finish_reason=reason, token_ids=list(row.generated),
            logprobs=list(row.logprobs) if params.logprobs else None,
            top_logprobs=list(row.top) if params.top_logprobs else None,
            prompt_tokens=len(request.prompt_ids), adapter=request.adapter, time_to_first_token=ttft,
        ))


def _non_finite(row: _Row) -> NonFiniteScores:
    where = f"adapter {row.request.adapter}" if row.request.adapter else "the base model"
    return NonFiniteScores(
        f"generation failed: the model's next-token scores (on {where}) were not finite (NaN or infinity) "
        f"after {len(row.generated)} generated tokens (an overflow or a NaN in the model's or the adapter's "
        "arithmetic); no token can be drawn from them"
    )


def _fill_holes(finished: list[bool]) -> list[int]:
    """Order of the surviving rows when each finished row's place goes to the last surviving row:
    ``[F, a, F, b, c] -> [b, a, c]`` (as indices ``[3, 1, 4]``)."""
    survivors = [i for i, done in enumerate(finished) if not done]
    order = list(range(len(survivors)))  # positions 0..n-1 of the new batch
    tail = [i for i in survivors if i >= len(survivors)]  # survivors beyond the new end move into holes
    holes = [i for i in range(len(survivors)) if finished[i]]
    moved = dict(zip(holes, tail, strict=True))
    return [moved.get(pos, pos) for pos in order]
