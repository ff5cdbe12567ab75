"""Turn one dataset record into one training document (a string)."""

from __future__ import annotations

from typing import Any, Callable, Literal

Format = Literal["text", "gsm8k", "csqa"]


class BadRecord(ValueError):
    """A record that lacks a field its format needs (the message names the field)."""


def _field(record: dict[str, Any], key: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BadRecord(f"missing field {key!r} (found {found})")
    return record[key]


def _string(record: dict[str, Any], key: str) -> str:
    value = _field(record, key)
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def format_text(record: dict[str, Any], text_field: str = "text") -> str:
    """The record's text field as it is."""
    return _string(record, text_field)


def format_gsm8k(record: dict[str, Any]) -> str:
    """A GSM8K problem with its worked solution (which ends in ``#### <answer>``)."""
    return f"Question: {_string(record, 'question')}\nAnswer: {_string(record, 'answer')}"


def format_csqa(record: dict[str, Any]) -> str:
    """A CommonsenseQA question, its lettered choices and the answer letter.

    Accepts the official jsonl schema (``question.stem``, ``question.choices[{label, text}]``) and
    the hub schema of ``tau/commonsense_qa`` (``question`` string, ``choices{label[], text[]}``).
    The answer line is left out where the key is empty (the unlabelled test split).
    """
    question = _field(record, "question")
    if isinstance(question, dict):
        stem = _string(question, "stem")
        choices = [(_string(c, "label"), _string(c, "text")) for c in _field(question, "choices")]
    else:
        stem = _string(record, "question")
        choices_field = _field(record, "choices")
        choices = list(zip(_field(choices_field, "label"), _field(choices_field, "text")))
    if not choices:
        raise BadRecord("field 'choices' is empty")
    lines = [f"Question: {stem}", *(f"{label}. {text}" for label, text in choices)]
    key = record.get("answerKey") or ""
    if key:
        lines.append(f"Answer: {key}")
    return "\n".join(lines)


def formatter(format: Format, text_field: str = "text") -> Callable[[dict[str, Any]], str]:
    """The function that turns a record of `format` into a document."""
    if format == "text":
        return lambda record: format_text(record, text_field)
    if format == "gsm8k":
        return format_gsm8k
    if format == "csqa":
        return format_csqa
    raise ValueError(f"data.format={format!r} is not one of 'text', 'gsm8k', 'csqa'")
