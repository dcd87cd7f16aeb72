"""Read and validate training JSONL, and summarise it in tokens.

One example per line, in one of the three forms of :mod:`adapters_core.training.examples` (chat,
completion, text), detected per line from its keys and required to be the same on every line.

Validation never stops at the first problem: :func:`read_examples` returns the valid examples together
with a :class:`ValidationReport` listing every error and warning with its 1-based line number and a
field path such as ``messages[2].role``. Line ``0`` means the file as a whole. :func:`validate_or_raise`
turns a report with errors into a :class:`DataError`; :func:`validate_file` (used by the REST API for
uploads) never raises on bad user data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters_core.errors import AdapterError
from adapters_core.json_objects import object_without_repeats
from adapters_core.training.examples import ROLES, Example, ExampleForm, Message
from adapters_core.training.tokenize import encode_example

logger = logging.getLogger(__name__)

Source = str | Path | bytes | Iterable[str]
"""A JSONL source: a path (``str`` or ``Path``), the file's bytes, or an iterable of lines."""

#: Chat template used to count chat tokens when the tokenizer has none. ChatML-style, like the tiny
#: models' template: each turn is ``<|im_start|>{role}\n{content}<|im_end|>\n``. On tokenizers without
#: these special tokens the markers are tokenized as ordinary text.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Maximum number of issues listed in a :class:`DataError` message.
MAX_LISTED_ISSUES = 20

_FORM_KEYS: dict[ExampleForm, frozenset[str]] = {
    "chat": frozenset({"messages"}),
    "completion": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
}
_MESSAGE_KEYS = frozenset({"role", "content", "weight"})


@dataclass(frozen=True)
class DataIssue:
    """One problem in the data: ``line`` is 1-based (0 = whole file), ``field`` a path or ``None``."""

    line: int
    field: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line > 0 else "file"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class DatasetSummary:
    """Counts over the valid examples; token fields stay ``None`` until :func:`token_summary` fills them.

    ``over_length`` examples are longer than ``max_seq_len``; ``over_length_handling`` says whether they
    will be ``"truncated"`` to ``max_seq_len`` tokens or ``"dropped"``. ``warnings`` name each of them.
    """

    examples: int = 0
    total_tokens: int | None = None
    max_tokens: int | None = None
    longest_line: int | None = None
    max_seq_len: int | None = None
    over_length: int = 0
    over_length_handling: Literal["truncated", "dropped"] | None = None
    warnings: list[DataIssue] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Everything found in one source: errors make it unusable, warnings do not."""

    errors: list[DataIssue] = field(default_factory=list)
    warnings: list[DataIssue] = field(default_factory=list)
    form: ExampleForm | None = None
    summary: DatasetSummary = field(default_factory=DatasetSummary)

    @property
    def ok(self) -> bool:
        """``True`` when there are no errors."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (for the REST API)."""

        def issues(items: list[DataIssue]) -> list[dict[str, Any]]:
            return [{"line": i.line, "field": i.field, "code": i.code, "message": i.message} for i in items]

        s = self.summary
        return {
            "ok": self.ok,
            "form": self.form,
            "errors": issues(self.errors),
            "warnings": issues(self.warnings),
            "summary": {
                "examples": s.examples,
                "total_tokens": s.total_tokens,
                "max_tokens": s.max_tokens,
                "longest_line": s.longest_line,
                "max_seq_len": s.max_seq_len,
                "over_length": s.over_length,
                "over_length_handling": s.over_length_handling,
            },
        }


class DataError(AdapterError, ValueError):
    """Training data failed validation; ``report`` holds every issue found."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        n = len(report.errors)
        lines = [f"training data has {n} error{'s' if n != 1 else ''}:"]
        lines += [f"  {issue}" for issue in report.errors[:MAX_LISTED_ISSUES]]
        if n > MAX_LISTED_ISSUES:
            lines.append(f"  ... and {n - MAX_LISTED_ISSUES} more")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------- reading


def _lines(source: Source) -> Iterator[tuple[int, str | None]]:
    """Yield ``(line_number, text)``; ``text`` is ``None`` for a line that is not valid UTF-8."""
    raw: Iterable[str | bytes]
    if isinstance(source, str | Path):
        raw = Path(source).read_bytes().splitlines()
    elif isinstance(source, bytes | bytearray):
        raw = bytes(source).splitlines()
    else:
        raw = source
    for number, item in enumerate(raw, start=1):
        if isinstance(item, bytes):
            if number == 1 and item.startswith(b"\xef\xbb\xbf"):
                item = item[3:]
            try:
                yield number, item.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
        else:
            line_text = str(item)
            yield number, line_text.removeprefix("\ufeff") if number == 1 else line_text


def _detect_form(obj: Mapping[str, Any]) -> ExampleForm | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _check_text(value: Any, line: int, path: str, errors: list[DataIssue]) -> str | None:
    """Return ``value`` if it is a non-blank string, else record an error and return ``None``."""
    if not isinstance(value, str):
        errors.append(DataIssue(line, path, "not_string", f"must be a string, got {type(value).__name__}"))
        return None
    if not value.strip():
        errors.append(DataIssue(line, path, "empty", "must not be empty or whitespace-only"))
        return None
    return value


def _parse_chat(
    obj: Mapping[str, Any], line: int, errors: list[DataIssue], warnings: list[DataIssue]
) -> Example | None:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        errors.append(
            DataIssue(line, "messages", "bad_messages", "must be a non-empty list of message objects")
        )
        return None
    n_errors = len(errors)
    parsed: list[Message] = []
    roles: list[str | None] = []
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            errors.append(DataIssue(line, path, "not_object", f"must be an object, got {type(msg).__name__}"))
            roles.append(None)
            continue
        for key in sorted(set(msg) - _MESSAGE_KEYS):
            warnings.append(DataIssue(line, f"{path}.{key}", "unknown_key", "unknown key ignored"))
        role = msg.get("role")
        if "role" not in msg:
            errors.append(DataIssue(line, f"{path}.role", "missing_key", "missing"))
        elif role not in ROLES:
            errors.append(
                DataIssue(
                    line, f"{path}.role", "bad_role", f"unknown role {role!r}; allowed: {', '.join(ROLES)}"
                )
            )
        roles.append(role if role in ROLES else None)
        if "content" not in msg:
            errors.append(DataIssue(line, f"{path}.content", "missing_key", "missing"))
            content = None
        else:
            content = _check_text(msg["content"], line, f"{path}.content", errors)
        weight = msg.get("weight", 1)
        if "weight" in msg:
            if type(weight) is not int or weight not in (0, 1):
                errors.append(
                    DataIssue(line, f"{path}.weight", "bad_weight", f"must be 0 or 1, got {weight!r}")
                )
            elif role in ROLES and role != "assistant":
                errors.append(
                    DataIssue(
                        line,
                        f"{path}.weight",
                        "weight_not_allowed",
                        f"only assistant turns take a weight, not {role!r}",
                    )
                )
        if isinstance(role, str) and content is not None:
            parsed.append(Message(role=role, content=content, weight=weight if weight in (0, 1) else 1))
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            errors.append(
                DataIssue(line, f"messages[{i}].role", "system_not_first", "a system turn must come first")
            )
    if "assistant" not in roles:
        errors.append(DataIssue(line, "messages", "no_assistant", "needs at least one assistant turn"))
    elif len(errors) == n_errors and all(m.weight == 0 for m in parsed if m.role == "assistant"):
        warnings.append(DataIssue(line, "messages", "no_trained_turn", "every assistant turn has weight 0"))
    if len(errors) > n_errors:
        return None
    return Example(form="chat", line=line, messages=tuple(parsed))


def _parse_line(
    obj: Mapping[str, Any], form: ExampleForm, line: int, errors: list[DataIssue], warnings: list[DataIssue]
) -> Example | None:
    for key in sorted(set(obj) - _FORM_KEYS[form]):
        warnings.append(DataIssue(line, key, "unknown_key", f"unknown key ignored in a {form} example"))
    if form == "chat":
        return _parse_chat(obj, line, errors, warnings)
    values: dict[str, str | None] = {}
    for key in sorted(_FORM_KEYS[form]):
        if key not in obj:
            errors.append(DataIssue(line, key, "missing_key", f"missing (a {form} example needs it)"))
            values[key] = None
        else:
            values[key] = _check_text(obj[key], line, key, errors)
    if any(v is None for v in values.values()):
        return None
    if form == "completion":
        return Example(
            form="completion", line=line, prompt=values["prompt"] or "", completion=values["completion"] or ""
        )
    return Example(form="text", line=line, text=values["text"] or "")


def read_examples(source: Source) -> tuple[list[Example], ValidationReport]:
    """Parse JSONL from ``source`` and validate every line.

    A ``str`` or ``Path`` is a file path, ``bytes`` the file's content, any other iterable yields lines.
    Blank lines are skipped but still counted. Returns the valid examples and a report of all issues;
    the report's ``summary.examples`` is the number of valid examples. Raises ``OSError`` only when a
    path cannot be read.
    """
    report = ValidationReport()
    errors, warnings = report.errors, report.warnings
    examples: list[Example] = []
    first_form_line = 0
    seen_line = False
    for line, text in _lines(source):
        if text is None:
            errors.append(DataIssue(line, None, "bad_encoding", "not valid UTF-8"))
            continue
        if not text.strip():
            continue
        seen_line = True
        try:
            obj = json.loads(text, object_pairs_hook=object_without_repeats)
        except RecursionError:
            errors.append(DataIssue(line, None, "bad_json", "invalid JSON: nested too deeply"))
            continue
        except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
            errors.append(DataIssue(line, None, "bad_json", f"invalid JSON: {exc}"))
            continue
        if _holds_lone_surrogate(obj):
            errors.append(DataIssue(line, None, "bad_text", "holds a lone UTF-16 surrogate escape (such as \\ud800), "
                                    "which is not text: encode each character as UTF-8 or as a surrogate pair"))
            continue
        if not isinstance(obj, dict):
            errors.append(
                DataIssue(line, None, "not_object", f"must be a JSON object, got {type(obj).__name__}")
            )
            continue
        form = _detect_form(obj)
        if form is None:
            keys = ", ".join(sorted(obj)) or "none"
            errors.append(
                DataIssue(
                    line,
                    None,
                    "unknown_form",
                    f"no form keys: expected 'messages' (chat), 'prompt'+'completion' or 'text' (keys: {keys})",
                )
            )
            continue
        if report.form is None:
            report.form, first_form_line = form, line
        example = _parse_line(obj, form, line, errors, warnings)
        if form != report.form:
            errors.append(
                DataIssue(
                    line,
                    None,
                    "mixed_forms",
                    f"{form} example, but line {first_form_line} is a {report.form} example; "
                    "a file must use one form",
                )
            )
        elif example is not None:
            examples.append(example)
    if not seen_line:
        errors.append(DataIssue(0, None, "empty_file", "no examples: the data is empty"))
    report.summary.examples = len(examples)
    logger.debug("read %d examples (%d errors, %d warnings)", len(examples), len(errors), len(warnings))
    return examples, report


# --------------------------------------------------------------------------------------------- tokens


def count_tokens(example: Example, tokenizer: Any) -> int:
    """Number of tokens ``example`` takes in training: exactly what
    :func:`adapters_core.training.tokenize.encode_example` produces (chat template, or
    :data:`FALLBACK_CHAT_TEMPLATE` when the tokenizer has none; EOS after completions and texts)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return len(encode_example(example, tokenizer, chat_template=template)[0])


def token_summary(
    examples: Sequence[Example], tokenizer: Any, max_seq_len: int | None, truncate: bool = True
) -> DatasetSummary:
    """Token statistics of ``examples``, with a ``too_long`` warning per example over ``max_seq_len``.

    Over-length examples will be truncated to ``max_seq_len`` tokens (``truncate=True``) or dropped.
    ``max_seq_len=None`` skips the length check.
    """
    summary = DatasetSummary(examples=len(examples), total_tokens=0, max_seq_len=max_seq_len)
    handling: Literal["truncated", "dropped"] = "truncated" if truncate else "dropped"
    for example in examples:
        n = count_tokens(example, tokenizer)
        summary.total_tokens = (summary.total_tokens or 0) + n
        if summary.max_tokens is None or n > summary.max_tokens:
            summary.max_tokens, summary.longest_line = n, example.line
        if max_seq_len is not None and n > max_seq_len:
            summary.over_length += 1
            what = f"truncated to {max_seq_len} tokens" if truncate else "dropped"
            summary.warnings.append(
                DataIssue(
                    example.line,
                    None,
                    "too_long",
                    f"{n} tokens exceeds max_seq_len {max_seq_len}; will be {what}",
                )
            )
    if summary.over_length:
        summary.over_length_handling = handling
        logger.info(
            "%d of %d examples exceed max_seq_len %s (%s)",
            summary.over_length,
            len(examples),
            max_seq_len,
            handling,
        )
    return summary


# --------------------------------------------------------------------------------------------- entry points


def validate_or_raise(
    source: Source, tokenizer: Any = None, max_seq_len: int | None = None, truncate: bool = True
) -> tuple[list[Example], ValidationReport]:
    """Read ``source`` (and count tokens when a tokenizer is given); raise :class:`DataError` on any error."""
    examples, report = read_examples(source)
    if report.errors:
        raise DataError(report)
    if tokenizer is not None:
        _attach_summary(report, token_summary(examples, tokenizer, max_seq_len, truncate))
    return examples, report


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a string in the parsed JSON ``value`` (keys included) holds a surrogate ``\\uXXXX`` escape that
    is not half of a pair: Python's parser keeps it, and nothing downstream can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(k) or _holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_lone_surrogate(v) for v in value)
    return False


def validate_file(
    path: str | Path, tokenizer: Any = None, max_seq_len: int | None = None, truncate: bool = True
) -> ValidationReport:
    """Validate an uploaded file; never raises on bad data (unreadable files and tokenizer failures too)."""
    try:
        examples, report = read_examples(Path(path))
    except OSError as exc:
        report = ValidationReport()
        report.errors.append(DataIssue(0, None, "unreadable", f"cannot read file: {exc}"))
        return report
    if tokenizer is not None and examples:
        try:
            _attach_summary(report, token_summary(examples, tokenizer, max_seq_len, truncate))
        except Exception as exc:  # a tokenizer choking on user text must not become a 500
            logger.warning("token count failed for %s: %s", path, exc)
            report.errors.append(DataIssue(0, None, "tokenize_failed", f"could not tokenize the data: {exc}"))
    return report


def _attach_summary(report: ValidationReport, summary: DatasetSummary) -> None:
    report.summary = summary
    report.warnings.extend(summary.warnings)
