"""Reading and checking body fields: the helpers every message type uses, and the value limits they share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from broker.protocol.frames import ProtocolError


MAX_COUNT = 2**31 - 1  # largest max_tokens and top_k


def _get(fields: dict, name: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
    value = fields.get(name, default)
    if value is None:
        if required:
            raise ProtocolError.about(name, "is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept it where a number is meant
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolError.about(name, f"must be {_kind_name(kinds)}")
    return value


def _kind_name(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "a map"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _number(fields: dict, name: str, default: float) -> float:
    try:
        return float(_get(fields, name, (int, float), default))
    except OverflowError:  # an integer too large for a float
        raise ProtocolError.about(name, "is out of range") from None


def _quote(value: Any) -> str:
    """A caller's value inside an error message, cut short: an answer must never outgrow its question."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "..."


def _reject_unknown(fields: dict, known: Iterable[str], at: str | None = None) -> None:
    """A ProtocolError naming the first of `fields` not in `known`; `at`: the path of a nested map."""
    unknown = sorted(map(str, set(fields) - set(known)))
    if unknown:
        name = unknown[0][:64]
        raise ProtocolError(f"unknown field {_quote(name if at is None else f'{at}.{name}')}",
                            name if at is None else at)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also rejects NaN
        raise ProtocolError.about(name, f"must be between {low} and {high}, got {value}")


def _canonical_json(value: Any, field: str) -> str:
    import json  # only for keys; the wire stays msgpack

    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # bin values or non-string keys: no JSON schema has them
        raise ProtocolError.about(field, f"is not JSON: {exc}") from None


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
