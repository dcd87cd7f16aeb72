"""OpenAI-compatible inference: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

``model`` is ``base`` (or the base model's own name) or an adapter reference (``name``, ``name@3``,
``name@prod``); the official ``openai`` client works unchanged with ``base_url=<server>/v1``. Fields
that would change the output but are not implemented (``echo``, ``suffix``, penalties,
``logit_bias``, tools, non-text content) are refused with 422 naming them, never ignored.
Extensions, as vLLM names them: ``top_k`` and ``min_tokens``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api import inference
from app.api.deps import Services, ServicesDep
from app.api.errors import ERROR_RESPONSES, ApiError, FieldError, serving_error_body
from app.registry import adapters as registry
from app.serving.engine import GenerationResult, StreamDelta
from app.serving.errors import RequestTooLarge, ServingError
from app.serving.host import ServingHost
from app.serving.sampling import SamplingParams
from app.serving.token_bytes import TextOffsets, text_offsets, token_bytes

router = APIRouter(prefix="/v1", tags=["openai"])

BASE_MODEL_ID = "base"
DEFAULT_CHAT_MAX_TOKENS = 512
MAX_N = 16
MAX_PROMPTS = 64


# --------------------------------------------------------------------------------------------- models
class ModelOut(BaseModel):
    id: str = Field(description="`base` or an adapter name; pass it as `model`.")
    object: Literal["model"] = Field(default="model", description="Always `model`.")
    created: int = Field(description="Unix time the adapter (or the server's base model) appeared.")
    owned_by: str = Field(default="adapterforge", description="Always `adapterforge`.")
    root: str = Field(description="What it resolves to now: the base model's name, or `name@N`.")
    parent: str | None = Field(description="`base` for adapters; null for the base model.")


class ModelList(BaseModel):
    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[ModelOut] = Field(description="The base model, then every live adapter in name order.")


def _base_entry(host: ServingHost, started: int) -> ModelOut:
    return ModelOut(id=BASE_MODEL_ID, created=started, root=host.name, parent=None)


def _adapter_entry(s: registry.AdapterSummary) -> ModelOut:
    return ModelOut(id=s.name, created=int(s.created_at.timestamp()), root=f"{s.name}@{s.latest_version}",
                    parent=BASE_MODEL_ID)


def _list_models(services: Services) -> list[registry.AdapterSummary]:
    out: list[registry.AdapterSummary] = []
    after = None
    with services.db.sessions() as session:
        while True:
            page, more = registry.list_adapters(session, limit=100, after=after)
            out.extend(s for s in page if s.latest_version is not None)
            if not more or not page:
                return out
            after = page[-1].name


@router.get("/models", response_model=ModelList, summary="List models",
            description="`base` (the resident base model) and every live adapter, each a value of `model` (an "
            "adapter this server cannot serve, e.g. of a rank above ADAPTERFORGE_MAX_LORA_RANK, answers 422 when used).",
            responses={503: inference.INFERENCE_ERRORS[503]})
async def list_models(services: ServicesDep) -> ModelList:
    host = inference.serving_host(services)
    summaries = await asyncio.to_thread(_list_models, services)
    return ModelList(data=[_base_entry(host, _started(services)), *(_adapter_entry(s) for s in summaries)])


@router.get("/models/{model:path}", response_model=ModelOut, summary="Retrieve a model",
            description="`base` or an adapter reference, resolved now.",
            responses={404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422], 503: inference.INFERENCE_ERRORS[503]})
async def retrieve_model(model: Annotated[str, PathParam(description="`base` or an adapter reference.")],
                         services: ServicesDep) -> ModelOut:
    host = inference.serving_host(services)
    ref = await _model_ref(services, host, model)
    if ref is None:
        return _base_entry(host, _started(services))
    version = await inference.resolve_adapter(services, ref, "model")
    assert version is not None
    summary = await asyncio.to_thread(_summary, services, version.ref.partition("@")[0])
    return ModelOut(id=model, created=int(summary.created_at.timestamp()), root=version.ref, parent=BASE_MODEL_ID)


def _summary(services: Services, name: str) -> registry.AdapterSummary:
    with services.db.sessions() as session:
        return registry.adapter_summary(session, name)


def _started(services: Services) -> int:
    return int(services.started_at)


async def _model_ref(services: Services, host: ServingHost, model: str) -> str | None:
    """The adapter reference ``model`` names, or ``None`` for the base model (``base`` or its own name). The base
    model's own name is refused (422) while an adapter bears it too: neither reading would be what all meant."""
    if model == BASE_MODEL_ID:
        return None
    if model != host.name:
        return model
    if await asyncio.to_thread(_adapter_exists, services, model):
        raise ApiError(422, f"model {model!r} names both the base model and an adapter: send `base` for the base "
                            f"model, or {model}@<version> for the adapter", param="model")
    return None


def _adapter_exists(services: Services, name: str) -> bool:
    with services.db.sessions() as session:
        try:
            registry.get_adapter(session, name)
        except registry.NotFound:
            return False
        return True


# --------------------------------------------------------------------------------------- shared fields
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no silent conversions: true is not 1, "5" not 5

    include_usage: bool = Field(default=False, description="Send a last chunk with the usage of the whole request.")


class _Common(BaseModel):
    """Fields both completion routes take."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no silent conversions: true is not 1, "5" not 5

    model: str = Field(max_length=256, description="`base` or an adapter reference (`name`, `name@3`, `name@prod`).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling; default 1.")
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="Choices per prompt; prompts x n at most the "
                          "server's ADAPTERFORGE_MAX_QUEUE_DEPTH (256 by default).")
    stream: bool | None = Field(default=None, description="Answer server-sent events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(default=None, description="`include_usage`.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Reproducible sampling; choice j uses seed + j.")
    presence_penalty: float | None = Field(default=None, description="Not supported: only 0 is accepted.")
    frequency_penalty: float | None = Field(default=None, description="Not supported: only 0 is accepted.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported: only empty is accepted.")
    user: str | None = Field(default=None, max_length=256, description="Your end-user id (OpenAI's abuse-monitoring tag): accepted, it does not change the output.")
    top_k: int | None = Field(default=None, ge=0, description="Extension: sample among the k likeliest tokens.")
    min_tokens: int | None = Field(default=None, ge=0, description="Extension: suppress end-of-sequence until this many tokens.")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Common:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise FieldError(name, f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise FieldError("logit_bias", "logit_bias is not supported by this server")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise FieldError("stop", "stop takes up to 4 non-empty strings")
        inference.refuse_lone_surrogates(stops, "stop")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options needs stream: true")
        return self

    def params(self, max_tokens: int, logprobs: int, choice: int) -> SamplingParams:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if (self.min_tokens or 0) > max_tokens:
            raise ApiError(422, f"min_tokens ({self.min_tokens}) is larger than the {max_tokens} tokens this request "
                           "generates (max_tokens, or its default)", param="min_tokens")
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=self.min_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            seed=None if self.seed is None else (self.seed + choice) % 2**63, stop=stops,
            logprobs=logprobs >= 0, top_logprobs=max(logprobs, 0),
        )


def _usage(results: Sequence[GenerationResult], prompt_counts: Sequence[int]) -> dict[str, int]:
    """OpenAI's usage: ``prompt_counts`` has each prompt's tokens once (as OpenAI counts them, whatever ``n``)."""
    prompt = sum(prompt_counts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(r: GenerationResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


# ---------------------------------------------------------------------------------------- completions
class CompletionRequest(_Common):
    """OpenAI's completion request."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text, texts, token ids or lists of them.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate per choice; default 16.")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Return the log-probability of each token "
                                 "and of the N likeliest alternatives.")
    echo: bool | None = Field(default=None, description="Not supported: only false is accepted.")
    suffix: str | None = Field(default=None, description="Not supported.")
    best_of: int | None = Field(default=None, ge=1, description="Only equal to n is accepted.")

    @model_validator(mode="after")
    def _refuse_completion_extras(self) -> CompletionRequest:
        if self.echo:
            raise FieldError("echo", "echo is not supported by this server")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise FieldError("best_of", "best_of must be at least n")
        if self.best_of not in (None, self.n or 1):
            raise FieldError("best_of", "best_of other than n is not supported by this server")
        p = self.prompt  # a list of token ids is one prompt, of any length
        if isinstance(p, list) and (not p or (len(p) > MAX_PROMPTS and not all(isinstance(x, int) for x in p))):
            raise FieldError("prompt", f"prompt as a list of prompts needs 1 to {MAX_PROMPTS} entries")
        return self

    def prompt_ids(self, host: ServingHost, check: Callable[[list[int], str], None]) -> list[list[int]]:
        """Every prompt's token ids, each passed to ``check(ids, its field)`` as it is made (a batch stops at its
        first prompt that cannot run). Blocking (tokenizers take time on long text): run it in a thread."""
        p = self.prompt
        if isinstance(p, list) and not (all(isinstance(x, int) for x in p) or all(isinstance(x, str) for x in p)
                                        or all(isinstance(x, list) for x in p)):
            raise ApiError(422, "prompt mixes strings and token lists", param="prompt")
        items: list[Any] = [p] if isinstance(p, str) or all(isinstance(x, int) for x in p) else list(p)
        out: list[list[int]] = []
        for item, name in zip(items, self.prompt_params(), strict=True):
            out.append(host.encode_prompt(item, name) if isinstance(item, str) else list(item))
            check(out[-1], name)
        return out

    def prompt_params(self) -> list[str]:
        """Each prompt's field, as errors name it: ``prompt``, or ``prompt[i]`` for a list of prompts."""
        p = self.prompt
        if isinstance(p, str) or all(isinstance(x, int) for x in p):
            return ["prompt"]
        return [f"prompt[{i}]" for i in range(len(p))]


def _check_ids(host: ServingHost, ids: list[int], name: str) -> None:
    vocab = len(host.tokenizer)
    if any(not 0 <= i < vocab for i in ids):
        raise ApiError(422, f"{name}: token ids must be in 0..{vocab - 1}", param=name)


def _completion_logprobs(host: ServingHost, r: GenerationResult) -> dict[str, Any] | None:
    if r.logprobs is None:
        return None
    offsets = [min(o, len(r.text)) for o in text_offsets(host.tokenizer, r.token_ids)]  # stop cut the text
    return _logprob_fields(host, list(zip(offsets, r.token_ids, r.logprobs, _steps(r.top_logprobs, r.token_ids),
                                          strict=True)))


_Step = tuple[int, int, float, list[tuple[int, float]]]  # text offset, token, its logprob, the likeliest tokens


def _steps(top: list[list[tuple[int, float]]] | None, token_ids: Sequence[int]) -> list[list[tuple[int, float]]]:
    return top if top is not None else [[] for _ in token_ids]


def _logprob_fields(host: ServingHost, steps: Sequence[_Step]) -> dict[str, Any]:
    """OpenAI's completion ``logprobs`` of ``steps``: ``top_logprobs`` always holds the sampled token (as
    OpenAI's do: up to ``logprobs`` + 1 entries, one with ``logprobs`` = 0)."""
    return {"tokens": [host.decode([t]) for _, t, _, _ in steps], "token_logprobs": [lp for _, _, lp, _ in steps],
            "top_logprobs": [_top_dict(host, top, token, lp) for _, token, lp, top in steps],
            "text_offset": [offset for offset, _, _, _ in steps]}


def _top_dict(host: ServingHost, step: list[tuple[int, float]], chosen: int, logprob: float) -> dict[str, float]:
    """OpenAI's ``{token text: logprob}``: the likeliest tokens and the sampled one (tokens decoding to the same
    text keep the likeliest)."""
    out: dict[str, float] = {}
    for token, lp in [*step, (chosen, logprob)]:
        text = host.decode([token])
        out[text] = max(lp, out.get(text, lp))
    return out


class UsageOut(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the prompts, each counted once whatever `n`.")
    completion_tokens: int = Field(description="Tokens generated, over every choice.")
    total_tokens: int = Field(description="The two together.")


class CompletionChoiceOut(BaseModel):
    index: int = Field(description="The choice's place: prompt i's choice j is i * n + j.")
    text: str = Field(description="The generated text (cut before a stop string).")
    logprobs: dict[str, Any] | None = Field(description="With `logprobs`: `tokens`, `token_logprobs`, `top_logprobs`, "
                                            "`text_offset`.")
    finish_reason: Literal["stop", "length"] = Field(description="`stop`: end of sequence or a stop string; "
                                                     "`length`: max_tokens.")


class _AnswerOut(BaseModel):
    """What OpenAI's completion and chat completion objects share."""

    id: str = Field(description="`cmpl-...` or `chatcmpl-...`.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="`base`, or the adapter version that answered (`name@N`).")
    usage: UsageOut = Field(description="Token counts.")


class CompletionOut(_AnswerOut):
    """OpenAI's completion object (``stream: false``)."""

    object: Literal["text_completion"] = Field(default="text_completion", description="Always `text_completion`.")
    choices: list[CompletionChoiceOut] = Field(description="n choices per prompt, in order.")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = Field(default="assistant", description="Always `assistant`.")
    content: str = Field(description="The generated text (cut before a stop string).")
    refusal: None = Field(default=None, description="Always null.")


class ChatChoiceOut(BaseModel):
    index: int = Field(description="The choice's place (0 to n - 1).")
    message: ChatMessageOut = Field(description="The assistant's turn.")
    logprobs: dict[str, Any] | None = Field(description="With `logprobs`: `{content: [{token, logprob, bytes, "
                                            "top_logprobs}], refusal: null}`.")
    finish_reason: Literal["stop", "length"] = Field(description="`stop`: end of sequence or a stop string; "
                                                     "`length`: the token limit.")


class ChatCompletionOut(_AnswerOut):
    """OpenAI's chat completion object (``stream: false``)."""

    object: Literal["chat.completion"] = Field(default="chat.completion", description="Always `chat.completion`.")
    system_fingerprint: None = Field(default=None, description="Always null.")
    choices: list[ChatChoiceOut] = Field(description="n choices, in order.")


def _sse_doc(answer: type[BaseModel]) -> dict[str, Any]:
    return {
        "model": answer,
        "description": "The answer; with `stream: true`, server-sent events of OpenAI's chunks, ending with "
        "`data: [DONE]` (after an `{error}` chunk where a generation failed).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }


@router.post("/completions", summary="Create a completion (OpenAI)",
             description="OpenAI's text completion on the base model or an adapter (`model`). Streams with `stream`.",
             responses={200: _sse_doc(CompletionOut), **inference.INFERENCE_ERRORS})
async def completions(body: CompletionRequest, request: Request, services: ServicesDep) -> Any:
    host = inference.serving_host(services)
    prompt_params = body.prompt_params()
    n = body.n or 1
    inference.check_queue_room(host, len(prompt_params), n, prompt_param="prompt")
    max_tokens = body.max_tokens or 16
    logprobs = -1 if body.logprobs is None else body.logprobs
    first = body.params(max_tokens, logprobs, 0)

    def check(ids: list[int], name: str) -> None:
        _check_ids(host, ids, name)
        host.engine.check_request(len(ids), first, prompt_param=name, length_param="max_tokens")

    prompts = await asyncio.to_thread(body.prompt_ids, host, check)  # (off the event loop: long text takes time)
    expanded = [ids for ids in prompts for _ in range(n)]
    params = [body.params(max_tokens, logprobs, j) for _ in prompts for j in range(n)]
    names = [name for name in prompt_params for _ in range(n)]  # (n choices per prompt, as expanded)
    ref = await _model_ref(services, host, body.model)
    generation = await inference.start(services, ref, "model", expanded, params,
                                       stream=bool(body.stream), prompt_params=names, length_param="max_tokens")
    meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": generation.adapter or BASE_MODEL_ID}
    if body.stream:
        events = await generation.opened_events(request, error_ends_all=True)  # (an error first: its status)
        return _sse(_completion_chunks(host, events, meta, prompts, body))
    results = await generation.results(request)
    choices = [{"index": i, "text": r.text, "logprobs": _completion_logprobs(host, r), "finish_reason": _finish(r)}
               for i, r in enumerate(results)]
    return {**meta, "choices": choices, "usage": _usage(results, [len(p) for p in prompts])}


async def _chunks(events: inference.Events, head: dict[str, Any], prompt_counts: Sequence[int],
                  include_usage: bool, delta_choice: Callable[[int, StreamDelta], dict[str, Any]],
                  end_choice: Callable[[int, str], dict[str, Any]],
                  opening: Sequence[dict[str, Any]] = ()) -> AsyncIterator[str]:
    """OpenAI's stream: ``opening`` choices, a chunk per delta, a chunk per finished choice, the usage
    when asked (then every other chunk says ``"usage": null``), ``[DONE]``; an engine error ends it with the
    error shape, then ``[DONE]``."""
    if include_usage:
        head = {**head, "usage": None}
    for choice in opening:
        yield inference.sse({**head, "choices": [choice]})
    results: list[GenerationResult] = []
    async for index, item in events:
        if isinstance(item, ServingError):  # the stream's answer is the error (the other choices stop)
            yield inference.sse(serving_error_body(item))
            yield inference.sse("[DONE]")
            return
        if isinstance(item, StreamDelta):
            yield inference.sse({**head, "choices": [delta_choice(index, item)]})
        else:
            results.append(item)
            yield inference.sse({**head, "choices": [end_choice(index, _finish(item))]})
    if include_usage:
        yield inference.sse({**head, "choices": [], "usage": _usage(results, prompt_counts)})
    yield inference.sse("[DONE]")


def _completion_chunks(host: ServingHost, events: inference.Events, meta: dict[str, Any],
                       prompts: list[list[int]], body: CompletionRequest) -> AsyncIterator[str]:
    """Per choice, a chunk's ``logprobs`` carry the tokens whose text starts within the text streamed so far
    (the engine streams tokens as they come but holds back text that could still become a stop string); the
    finishing chunk carries the rest, their offsets clamped to the text as a stop string cut it: the offsets,
    streamed, are exactly the non-streamed ones."""
    offsets: dict[int, TextOffsets] = {}  # per choice: offsets run over the whole text streamed so far
    sent: dict[int, int] = {}  # per choice: characters of text streamed
    pending: dict[int, list[_Step]] = {}  # per choice: tokens whose text is not streamed yet

    def delta(index: int, item: StreamDelta) -> dict[str, Any]:
        sent[index] = sent.get(index, 0) + len(item.text)
        lp = None
        if item.logprobs is not None:
            at = offsets.setdefault(index, TextOffsets(host.tokenizer)).add(item.token_ids)
            queue = pending.setdefault(index, [])
            queue.extend(zip(at, item.token_ids, item.logprobs, _steps(item.top_logprobs, item.token_ids),
                             strict=True))
            ready = next((i for i, step in enumerate(queue) if step[0] > sent[index]), len(queue))
            lp, pending[index] = _logprob_fields(host, queue[:ready]), queue[ready:]
        return {"index": index, "text": item.text, "logprobs": lp, "finish_reason": None}

    def end(index: int, reason: str) -> dict[str, Any]:
        end_at = sent.get(index, 0)
        rest = [(min(o, end_at), token, logprob, top) for o, token, logprob, top in pending.pop(index, [])]
        lp = _logprob_fields(host, rest) if rest else None
        return {"index": index, "text": "", "logprobs": lp, "finish_reason": reason}

    usage = body.stream_options is not None and body.stream_options.include_usage
    return _chunks(events, meta, [len(p) for p in prompts], usage, delta, end)


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------------- chat completions
class ChatMessageIn(BaseModel):
    """A chat message; content is text or text parts."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no silent conversions: true is not 1, "5" not 5

    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[dict[str, Any]] | None = Field(default=None, description="Text, or a list of `text` parts.")
    name: str | None = Field(default=None, max_length=256, description="Participant name, given to the chat "
                             "template (refused where the base model's template does not use it).")

    def text(self, where: str) -> str:
        if self.content is None:
            raise ApiError(422, f"{where}.content is required (null content goes with tool calls, which this server "
                                "does not support)", param=f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(422, f"{where}.content[{j}]: only text parts are supported", param=f"{where}.content")
            for key in sorted(set(part) - {"type", "text"}):  # (e.g. cache_control: refused, never ignored)
                raise ApiError(422, f"{where}.content[{j}].{key} is not supported by this server",
                               param=f"{where}.content[{j}].{key}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """OpenAI's chat completion request."""

    messages: list[ChatMessageIn] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate (deprecated name).")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate; default: "
                                              f"{DEFAULT_CHAT_MAX_TOKENS} or what fits the context.")
    logprobs: bool | None = Field(default=None, description="Return the log-probability of each output token.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With `logprobs`: the N likeliest "
                                     "alternatives at each position.")
    response_format: dict[str, Any] | None = Field(default=None, description="Only `{\"type\": \"text\"}`.")
    tools: list[Any] | None = Field(default=None, description="Not supported.")
    tool_choice: Any = Field(default=None, description="Not supported.")

    @model_validator(mode="after")
    def _refuse_chat_extras(self) -> ChatCompletionRequest:
        if self.tools:
            raise FieldError("tools", "tools are not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise FieldError("tool_choice", "tool_choice other than \"none\" is not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            raise FieldError("response_format", "response_format other than text is not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise FieldError("max_tokens", "max_tokens and max_completion_tokens differ: send one of them")
        return self


def _chat_logprobs(host: ServingHost, token_ids: list[int], logprobs: list[float] | None,
                   top: list[list[tuple[int, float]]] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for k, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        alts = [] if top is None else [
            {"token": host.decode([i]), "logprob": v, "bytes": list(token_bytes(host.tokenizer, i))} for i, v in top[k]
        ]
        content.append({"token": host.decode([tid]), "logprob": lp, "bytes": list(token_bytes(host.tokenizer, tid)),
                        "top_logprobs": alts})
    return {"content": content, "refusal": None}


@router.post("/chat/completions", summary="Create a chat completion (OpenAI)",
             description="OpenAI's chat completion on the base model or an adapter (`model`), rendered with the "
             "base model's chat template. Streams with `stream`.",
             responses={200: _sse_doc(ChatCompletionOut), **inference.INFERENCE_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, services: ServicesDep) -> Any:
    host = inference.serving_host(services)
    n = body.n or 1
    inference.check_queue_room(host, 1, n, prompt_param="messages")
    messages = [{"role": m.role, "content": m.text(f"messages[{i}]"),
                 **({"name": m.name} if m.name is not None else {})} for i, m in enumerate(body.messages)]
    ids = await asyncio.to_thread(_conversation_ids, host, messages)  # (off the event loop: long text takes time)
    max_tokens = body.max_completion_tokens or body.max_tokens or _default_chat_tokens(host, len(ids))
    logprobs = (body.top_logprobs or 0) if body.logprobs else -1
    params = [body.params(max_tokens, logprobs, j) for j in range(n)]
    length_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    ref = await _model_ref(services, host, body.model)
    generation = await inference.start(services, ref, "model", [ids] * n, params,
                                       stream=bool(body.stream), prompt_params=["messages"] * n,
                                       length_param=length_param)
    meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": generation.adapter or BASE_MODEL_ID, "system_fingerprint": None}
    if body.stream:
        events = await generation.opened_events(request, error_ends_all=True)  # (an error first: its status)
        return _sse(_chat_chunks(host, events, n, meta, len(ids), body))
    results = await generation.results(request)
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": _chat_logprobs(host, r.token_ids, r.logprobs, r.top_logprobs), "finish_reason": _finish(r)}
               for i, r in enumerate(results)]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(results, [len(ids)])}


def _conversation_ids(host: ServingHost, messages: list[dict[str, Any]]) -> list[int]:
    """The conversation's prompt, refused (422) where it leaves no room for a new token or where the chat
    template drops a message's participant ``name`` (a name must change the prompt). Blocking.

    Which names the template drops is read from one rendering with each name replaced by a random marker
    (a marker missing from the text: that name may be dropped); only those are confirmed, each by rendering
    the conversation without it, so a long conversation of named messages costs two renderings, not one
    per message."""
    ids = host.encode_chat(messages)
    host.engine.check_request(len(ids), SamplingParams(max_new_tokens=1), prompt_param="messages")
    named = [i for i, m in enumerate(messages) if "name" in m]
    if not named:
        return ids
    markers = {i: f"{secrets.randbelow(10**12):012d}{i:06d}" for i in named}  # digits: no filter changes them
    try:
        text = host.render_chat([{**m, "name": markers[i]} if i in markers else m for i, m in enumerate(messages)])
    except RequestTooLarge:  # a template that refuses the markers (it checks names): every name is checked on its own
        text = ""
    for i in named:
        if markers[i] in text:
            continue
        if host.encode_chat([{k: v for k, v in m.items() if k != "name" or j != i} for j, m in enumerate(messages)]) == ids:
            raise ApiError(422, f"messages[{i}].name: the base model's chat template does not use this message's "
                                "participant name: send it without `name`", param=f"messages[{i}].name")
    return ids


def _default_chat_tokens(host: ServingHost, prompt_tokens: int) -> int:
    room = host.limits.max_batch_tokens - prompt_tokens
    if host.limits.max_context is not None:
        room = min(room, host.limits.max_context - prompt_tokens)
    return max(1, min(DEFAULT_CHAT_MAX_TOKENS, room))


def _chat_chunks(host: ServingHost, events: inference.Events, n: int, meta: dict[str, Any],
                 prompt_tokens: int, body: ChatCompletionRequest) -> AsyncIterator[str]:
    def delta(index: int, item: StreamDelta) -> dict[str, Any]:
        lp = _chat_logprobs(host, item.token_ids, item.logprobs, item.top_logprobs)
        return {"index": index, "delta": {"content": item.text}, "logprobs": lp, "finish_reason": None}

    def end(index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}

    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(n)]
    usage = body.stream_options is not None and body.stream_options.include_usage
    return _chunks(events, {**meta, "object": "chat.completion.chunk"}, [prompt_tokens], usage, delta,
                   end, opening)
