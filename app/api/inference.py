"""What ``/generate`` and the OpenAI routes share: resolve the adapter, lease it, submit prompts,
collect results or stream events, and stop generating when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from app.api.deps import Services
from app.api.errors import ERROR_RESPONSES, ApiError, FieldError, error_doc, serving_error_body
from app.registry import adapters as registry
from app.registry.models import AdapterVersion
from app.serving.bank import AdapterLease
from app.serving.engine import GenerationResult, RequestHandle, StreamDelta
from app.serving.errors import AdapterNotFound, RequestTooLarge, ServingError, ServingUnavailable
from app.serving.host import ServedVersion, ServingHost
from app.serving.sampling import SamplingParams
from app.serving.text import lone_surrogate

# the error answers of every inference route, for their OpenAPI description
INFERENCE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("invalid_json", "the body is not valid JSON"),
    404: ERROR_RESPONSES[404],
    413: error_doc("payload_too_large", "the body is over ADAPTERFORGE_MAX_REQUEST_BYTES", 413),
    422: ERROR_RESPONSES[422],
    429: error_doc("rate_limited", "ADAPTERFORGE_MAX_QUEUE_DEPTH requests already wait (Retry-After)", 429,
                   retry_after=True),
    500: error_doc("internal_error", "the generation failed: a forward on the device, or this request's "
                   "next-token scores were not finite", 500),
    503: error_doc("unavailable", "inference is disabled or stopping, or every adapter slot is pinned to other "
                   "adapters (Retry-After)", 503, retry_after=True),
}


def refuse_lone_surrogates(texts: Sequence[str], param: str) -> None:
    """422 naming ``param`` for a text (a stop string) holding a lone UTF-16 surrogate, which no text contains."""
    for text in texts:
        if (at := lone_surrogate(text)) is not None:
            raise FieldError(param, f"{param} holds a lone UTF-16 surrogate at character {at}, which no text contains")


def serving_host(services: Services) -> ServingHost:
    if services.serving is None:
        raise ServingUnavailable(
            "inference is disabled on this server (ADAPTERFORGE_SERVING_ENABLED=false)", retry_after=60.0
        )
    return services.serving


def resolve_version(services: Services, ref: str, param: str) -> ServedVersion:
    """The live registry version ``ref`` names, now (blocking: run it in a thread from async code).
    The database answers which version that is, in one small query every time (a new version, a
    moved alias or a deletion counts at once, whichever process made it); the version's fields, which
    never change, come from the serving host's memory after its first request."""
    name = ref.partition("@")[0]
    known = services.serving.versions if services.serving is not None else None
    with services.db.sessions() as session:
        try:
            version_id, number = registry.resolve_ref_id(session, ref)
            label = f"{name}@{number}"
            served = known.get(version_id) if known is not None else None
            if served is not None and served.ref == label:
                return served
            version = session.get(AdapterVersion, version_id)
            if version is None or version.deleted_at is not None:  # deleted since the query above
                version = registry.resolve_ref(session, ref)
                label = f"{name}@{version.version}"
        except registry.NotFound as exc:
            hint = ""
            if name in registry.RESERVED_NAMES and param == "adapter":
                hint = f" ({name!r} is reserved for the base model, which /generate serves without `adapter`)"
            raise AdapterNotFound(f"{exc}{hint}", param=param) from exc
        except registry.InvalidName as exc:
            raise ApiError(422, str(exc), param=param) from exc
        served = ServedVersion(version.id, label, dict(version.config), dict(version.files), version.base_model)
    if known is not None:
        known.put(served)
    return served


async def resolve_adapter(services: Services, ref: str | None, param: str) -> ServedVersion | None:
    """The registry version ``ref`` names (latest, number or alias, resolved now), or ``None`` for the base."""
    if ref is None:
        return None
    return await asyncio.to_thread(resolve_version, services, ref, param)


# what a streamed generation yields: (prompt index, a delta, a prompt's result, or a prompt's error)
Events = AsyncGenerator[tuple[int, StreamDelta | GenerationResult | ServingError], None]


@dataclass
class Generation:
    """The prompts of one API request, submitted to the engine."""

    adapter: str | None
    handles: list[RequestHandle]
    param: str = "adapter"  # the request's field naming the adapter (the OpenAI routes': "model")

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def results(self, request: Request) -> list[GenerationResult]:
        """Every prompt's result; generation stops if the client disconnects first."""
        gathered: asyncio.Future[list[GenerationResult]] = asyncio.ensure_future(
            asyncio.gather(*(h.result() for h in self.handles))
        )
        gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
        try:
            waiters: list[asyncio.Future[Any]] = [gathered, gone]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not gathered.done():
            self.cancel()
            gathered.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServingError):
                await gathered
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        try:
            return list(gathered.result())
        except ServingError as exc:  # one prompt failed: the answer is its error, so stop the others
            self.cancel()
            raise in_request_terms(exc, self.param) from None
        except BaseException:
            self.cancel()
            raise

    async def opened_events(self, request: Request, *, error_ends_all: bool) -> Events:
        """:meth:`events`, once the first has come. A stream's status line goes out with its first byte, so
        where an error ends the whole request (``error_ends_all``: one prompt, or the OpenAI routes) an
        error that comes before any output (no free slot, a failed slot load, scores not finite at the
        first step) is raised here, to answer with its own status (503, 500, ...) rather than a 200 stream
        that only carries it. The output starts as soon as it would have anyway: with the first token.
        A client that leaves while this waits cancels the generation (499)."""
        events = self.events()
        first: asyncio.Future[Any] = asyncio.ensure_future(anext(events))
        gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([first, gone], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler cancelled (the server stopping): so are the prompts
            first.cancel()
            self.cancel()
            raise
        finally:
            gone.cancel()
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await first
            self.cancel()  # (the generator may not have started: its own clean-up would not run)
            await events.aclose()
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        index, item = first.result()
        if isinstance(item, ServingError) and error_ends_all:
            await events.aclose()
            raise item

        async def replay() -> Events:
            try:
                yield index, item
                async for event in events:
                    yield event
            finally:
                await events.aclose()

        return replay()

    async def events(self) -> Events:
        """``(prompt index, delta or result or error)`` in the order they happen; cancels on exit."""
        if len(self.handles) == 1:
            try:
                async for item in self.handles[0].events():
                    yield 0, item
            except ServingError as exc:
                yield 0, in_request_terms(exc, self.param)
            finally:
                self.cancel()
            return
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for item in handle.events():
                    await merged.put((index, item))
            except ServingError as exc:
                await merged.put((index, in_request_terms(exc, self.param)))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        open_prompts = len(tasks)
        try:
            while open_prompts:
                index, item = await merged.get()
                if not isinstance(item, StreamDelta):
                    open_prompts -= 1
                yield index, item
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()


def in_request_terms(exc: ServingError, param: str) -> ServingError:
    """``exc`` naming the request's own field for the adapter (``model`` on the OpenAI routes) where the
    serving layer named it ``adapter``: a copy, as one error may answer several requests."""
    if exc.param != "adapter" or param == "adapter":
        return exc
    renamed = copy.copy(exc)
    renamed.param = param
    return renamed


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _leased(services: Services, ref: str, param: str, count: int) -> tuple[ServedVersion, list[AdapterLease]]:
    """:func:`_lease` in a thread. If the awaiting task is cancelled meanwhile (the server stopping), the
    thread still finishes: the leases it then takes are released, not left holding the adapter for ever."""
    work = asyncio.ensure_future(asyncio.to_thread(_lease, services, ref, param, count))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        def release(done: asyncio.Future[tuple[ServedVersion, list[AdapterLease]]]) -> None:
            if not done.cancelled() and done.exception() is None:
                for lease in done.result()[1]:
                    serving_host(services).bank.release(lease)

        work.add_done_callback(release)
        raise


def _lease(services: Services, ref: str, param: str, count: int) -> tuple[ServedVersion, list[AdapterLease]]:
    """Resolve ``ref`` and lease its version ``count`` times (blocking: one thread hop for both)."""
    host = serving_host(services)
    version = resolve_version(services, ref, param)
    leases: list[AdapterLease] = []
    try:
        for _ in range(count):
            leases.append(host.lease(version, services.store))
    except BaseException:
        for lease in leases:
            host.bank.release(lease)
        raise
    return version, leases


def check_queue_room(host: ServingHost, prompts: int, choices: int, *, prompt_param: str) -> None:
    """Refuse (422, naming ``n`` or ``prompt_param``) a request of more generations (prompts x choices) than
    may wait at once: it could never be queued, even on an idle server (429 is for a full queue)."""
    depth = host.limits.max_queue_depth
    total = prompts * choices
    if total <= depth:
        return
    made = f"{prompts} prompt{'s' if prompts > 1 else ''}" + (f" x n={choices}" if choices > 1 else "")
    raise RequestTooLarge(
        f"this request makes {total} generations ({made}), above this server's limit of {depth} waiting at once "
        f"(ADAPTERFORGE_MAX_QUEUE_DEPTH): send at most {depth} per request",
        param=prompt_param if prompts > depth or choices == 1 else "n",
    )


async def start(services: Services, adapter: str | None, param: str, prompts: Sequence[list[int]],
                params: Sequence[SamplingParams], *, stream: bool, prompt_params: Sequence[str],
                length_param: str) -> Generation:
    """Check the prompts, resolve and lease the adapter ``adapter`` names (``None``: the base model) and
    queue every prompt; all of them or none (errors raise). ``prompt_params``: each prompt's field in the
    request (``prompt[1]``), ``length_param`` the request's field for new tokens: an error names them."""
    host = serving_host(services)
    for ids, p, name in zip(prompts, params, prompt_params, strict=True):
        host.engine.check_request(len(ids), p, prompt_param=name, length_param=length_param)
    version: ServedVersion | None = None
    leases: list[AdapterLease | None] = [None] * len(prompts)
    host.engine.check_room(len(prompts))  # (a full queue answers 429 before the adapter is read for nothing)
    if adapter is not None:
        try:
            version, leased = await _leased(services, adapter, param, len(prompts))
        except ServingError as exc:  # a version that cannot be served (rank, base model) names `param`
            raise in_request_terms(exc, param) from None
        leases = list(leased)
    try:  # all or none: a request refused here leaves nothing queued
        handles = host.engine.submit_all(list(zip(prompts, params, leases, strict=True)),
                                         loop=asyncio.get_running_loop(), stream=stream)
    except BaseException:
        for lease in leases:
            if lease is not None:
                host.bank.release(lease)
        raise
    return Generation(version.ref if version is not None else None, handles, param)


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event (``data`` as JSON, or verbatim when a string)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


def sse_error(exc: ServingError, index: int | None = None) -> str:
    """An ``error`` event; ``index``: the prompt of the request it ended, where the request has several."""
    head = {} if index is None else {"index": index}
    return sse(head | serving_error_body(exc), event="error")
