"""``POST /generate?adapter=REF``: text from the resident base model with any registered adapter.

``REF`` is ``name`` (latest version), ``name@3`` or ``name@prod``, resolved at request time (a new
version or a moved alias is served at once); no ``adapter`` means the base model. One prompt (or
conversation) answers one result; a list answers ``{"results": [...]}``; ``stream: true`` answers
server-sent events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api import inference
from app.api.deps import ServicesDep
from app.api.errors import FieldError
from app.serving.engine import GenerationResult, StreamDelta
from app.serving.errors import ServingError
from app.serving.host import ServingHost
from app.serving.sampling import SamplingParams

router = APIRouter(tags=["inference"])

MAX_PROMPTS = 64
MAX_STOPS = 16


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no silent conversions: true is not 1, "5" not 5

    role: str = Field(min_length=1, max_length=64, description="`system`, `user`, `assistant`, ... as the chat template knows them.")
    content: str = Field(description="The turn's text.")


class GenerateRequest(BaseModel):
    """What to generate from, and how."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no silent conversions: true is not 1, "5" not 5

    prompt: str | list[str] | None = Field(
        default=None, description="Text to continue, or a list of texts (a batch). Give `prompt` or `messages`.",
        json_schema_extra={"maxItems": MAX_PROMPTS},
    )
    messages: list[ChatMessage] | list[list[ChatMessage]] | None = Field(
        default=None, description="A conversation rendered with the base model's chat template (with the "
        "assistant turn opened), or a list of conversations.",
    )
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000, description="Most tokens to generate per prompt.")
    min_new_tokens: int = Field(default=0, ge=0, le=1_000_000,
                                description="End-of-sequence tokens are suppressed until this many were generated.")
    temperature: float = Field(default=1.0, ge=0.0, le=10.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: the smallest token set "
                         "reaching this probability.")
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="Sample among the k likeliest tokens; 0 = all.")
    stop: str | list[str] | None = Field(default=None, description=f"Up to {MAX_STOPS} strings that end the "
                                         "generation; the text is cut before the first one.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Seed for reproducible sampling: the "
                             "same request with the same seed gives the same tokens.")
    logprobs: bool = Field(default=False, description="Return each generated token's log-probability (of the "
                           "model's raw distribution, before temperature/top-k/top-p).")
    top_logprobs: int = Field(default=0, ge=0, le=20, description="Also return the k likeliest tokens at each step.")
    stream: bool = Field(default=False, description="Answer server-sent events: `token` events with new text, "
                         "then one `result` event per prompt.")

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of `prompt` and `messages`")
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise FieldError("prompt", f"`prompt` as a list needs 1 to {MAX_PROMPTS} prompts")
        if self.messages is not None and not self.messages:
            raise FieldError("messages", "`messages` is empty")
        if self.messages is not None and isinstance(self.messages[0], list) and (
            len(self.messages) > MAX_PROMPTS or not all(self.messages)
        ):
            raise FieldError("messages", f"`messages` as a list of conversations needs 1 to {MAX_PROMPTS} non-empty ones")
        if self.min_new_tokens > self.max_new_tokens:
            raise FieldError("min_new_tokens", "`min_new_tokens` is larger than `max_new_tokens`")
        stops = self.stops
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise FieldError("stop", f"`stop` takes up to {MAX_STOPS} non-empty strings")
        inference.refuse_lone_surrogates(stops, "stop")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def batched(self) -> bool:
        return isinstance(self.prompt, list) or (self.messages is not None and isinstance(self.messages[0], list))

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stops,
            logprobs=self.logprobs or self.top_logprobs > 0, top_logprobs=self.top_logprobs,
        )

    def token_ids(self, host: ServingHost, check: Callable[[list[int], str], None]) -> list[list[int]]:
        """Every prompt's token ids, each passed to ``check(ids, its field)`` as it is made, so that a batch
        stops at its first prompt that cannot run. Blocking (tokenizers take time on long text): run it in a
        thread."""
        out: list[list[int]] = []
        params = iter(self.prompt_params(self.count))
        if self.prompt is not None:
            for prompt in self.prompt if isinstance(self.prompt, list) else [self.prompt]:
                param = next(params)
                out.append(host.encode_prompt(prompt, param))
                check(out[-1], param)
            return out
        assert self.messages is not None
        for conversation in self.messages if isinstance(self.messages[0], list) else [self.messages]:
            param = next(params)
            out.append(host.encode_chat([m.model_dump() for m in conversation], param=param))
            check(out[-1], param)
        return out

    @property
    def count(self) -> int:
        """Prompts (or conversations) in the request."""
        if self.prompt is not None:
            return len(self.prompt) if isinstance(self.prompt, list) else 1
        assert self.messages is not None
        return len(self.messages) if isinstance(self.messages[0], list) else 1

    def prompt_params(self, count: int) -> list[str]:
        """Each prompt's field, as errors name it: ``prompt``, or ``prompt[i]`` in a batch (``messages`` alike)."""
        field = "prompt" if self.prompt is not None else "messages"
        return [f"{field}[{i}]" for i in range(count)] if self.batched else [field] * count


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template).")
    completion_tokens: int = Field(description="Tokens generated.")


class TopLogprob(BaseModel):
    id: int = Field(description="Token id.")
    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its log-probability.")


class GenerateResult(BaseModel):
    """The answer to one prompt."""

    text: str = Field(description="Generated text (cut before a stop string; no end-of-sequence token).")
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: an end-of-sequence token or a stop string; `length`: max_new_tokens reached."
    )
    adapter: str | None = Field(description="The adapter version that generated it (`name@N`); null = base model.")
    usage: Usage = Field(description="Token counts.")
    tokens: list[int] = Field(description="Generated token ids (an ending end-of-sequence token included).")
    logprobs: list[float] | None = Field(description="Log-probability of each generated token (with `logprobs`).")
    top_logprobs: list[list[TopLogprob]] | None = Field(
        default=None, description="The likeliest tokens at each step (with `top_logprobs`)."
    )


class GenerateBatch(BaseModel):
    """The answers to a list of prompts, in order."""

    adapter: str | None = Field(description="The adapter version used (`name@N`); null = base model.")
    results: list[GenerateResult] = Field(description="One result per prompt, in order.")
    usage: Usage = Field(description="Token counts over all prompts.")


def _top(host: ServingHost, steps: list[list[tuple[int, float]]] | None) -> list[list[TopLogprob]] | None:
    if steps is None:
        return None
    return [[TopLogprob(id=i, token=host.decode([i]), logprob=lp) for i, lp in step] for step in steps]


def result_out(host: ServingHost, r: GenerationResult) -> GenerateResult:
    return GenerateResult(
        text=r.text, finish_reason="length" if r.finish_reason == "length" else "stop", adapter=r.adapter,
        usage=Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids)), tokens=r.token_ids,
        logprobs=r.logprobs, top_logprobs=_top(host, r.top_logprobs),
    )


AdapterQuery = Annotated[str | None, Query(
    max_length=256, description="Adapter reference: `name` (latest version), `name@3` or `name@prod`; omit for the base model."
)]

_STREAM_DOC = {
    "description": "With `stream: true`: server-sent events. `event: token` carries `{index, text, tokens, "
    "logprobs}` for new output; `event: result` carries `{index, ...result}` when a prompt is done; "
    "`event: error` carries `{index, error}` when prompt `index` fails (the others go on). The stream starts with "
    "its first event: a one-prompt request whose error comes before any output answers that error's status.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@router.post(
    "/generate",
    response_model=GenerateResult | GenerateBatch,
    summary="Generate text",
    description="Generate from the base model with the adapter `REF` hot-swapped in (no adapter = the base model). "
    "Requests from concurrent clients share batches; each row uses its own adapter. Answers 404 for an unknown "
    "adapter, 422 for an adapter that does not fit this base model, a prompt too long or more prompts than "
    "ADAPTERFORGE_MAX_QUEUE_DEPTH, 429 when too many "
    "requests wait and 503 when no adapter slot can be freed (both with `Retry-After`).",
    responses={200: _STREAM_DOC, **inference.INFERENCE_ERRORS},
)
async def generate(body: GenerateRequest, request: Request, services: ServicesDep,
                   adapter: AdapterQuery = None) -> Any:
    host = inference.serving_host(services)
    inference.check_queue_room(host, body.count, 1, prompt_param="prompt" if body.prompt is not None else "messages")
    params = body.sampling()

    def check(ids: list[int], param: str) -> None:
        host.engine.check_request(len(ids), params, prompt_param=param, length_param="max_new_tokens")

    prompts = await asyncio.to_thread(body.token_ids, host, check)  # (off the event loop: long text takes time)
    generation = await inference.start(services, adapter, "adapter", prompts, [params] * len(prompts),
                                       stream=body.stream, prompt_params=body.prompt_params(len(prompts)),
                                       length_param="max_new_tokens")
    if body.stream:  # (one prompt: an error before any output answers with its status; several: in the stream)
        events = await generation.opened_events(request, error_ends_all=len(prompts) == 1)
        return StreamingResponse(_stream(host, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    results = [result_out(host, r) for r in await generation.results(request)]
    if not body.batched:
        return results[0]
    usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in results),
                  completion_tokens=sum(r.usage.completion_tokens for r in results))
    return GenerateBatch(adapter=generation.adapter, results=results, usage=usage)


async def _stream(host: ServingHost, events: inference.Events) -> Any:
    async for index, item in events:
        if isinstance(item, StreamDelta):
            yield inference.sse({"index": index, "text": item.text, "tokens": item.token_ids,
                                 "logprobs": item.logprobs, "top_logprobs": _dump_top(host, item.top_logprobs)},
                                event="token")
        elif isinstance(item, GenerationResult):
            yield inference.sse({"index": index, **result_out(host, item).model_dump()}, event="result")
        elif isinstance(item, ServingError):
            yield inference.sse_error(item, index)


def _dump_top(host: ServingHost, steps: list[list[tuple[int, float]]] | None) -> Any:
    top = _top(host, steps)
    return None if top is None else [[t.model_dump() for t in step] for step in top]
