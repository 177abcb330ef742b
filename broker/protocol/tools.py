"""Tools on the wire: the functions a request offers the model and the calls an assistant made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol.frames import ProtocolError
from broker.protocol.fields import _canonical_json, _quote, _reject_unknown


TOOL_CHOICES = ("auto", "required")  # auto: a reply or calls; required: calls only
MAX_TOOLS = 128


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call an assistant made: its id, the function's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_fields(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_fields(cls, value: Any, name: str) -> ToolCall:
        if not isinstance(value, dict):
            raise ProtocolError.about(name, "must be a map with 'id', 'name' and 'arguments'")
        fields = []
        for key in ("id", "name", "arguments"):
            if not isinstance(value.get(key), str):
                raise ProtocolError.about(f"{name}.{key}", "must be a string")
            fields.append(value[key])
        return cls(*fields)


@dataclass(frozen=True, slots=True)
class Function:
    """A tool the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def __post_init__(self) -> None:  # errors name the field inside the function; callers put its path in front
        if not isinstance(self.name, str) or not self.name:
            raise ProtocolError.about("name", "must be a non-empty string")
        if not isinstance(self.parameters, dict):
            raise ProtocolError.about("parameters", "must be a JSON schema map")
        if self.description is not None and not isinstance(self.description, str):
            raise ProtocolError.about("description", "must be a string")

    @classmethod
    def at(cls, path: str, name: Any, parameters: Any, description: Any = None) -> Function:
        """A function offered at `path` (`tools.functions[0]`): its errors name their field under it."""
        try:
            return cls(name, parameters, description)
        except ProtocolError as exc:
            raise exc.renamed(f"{path}.{exc.field}") from None

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fields["description"] = self.description
        return fields


@dataclass(frozen=True, slots=True)
class Tools:
    """The tools a request offers, and how the answer may use them.

    `choice` auto: a text reply or calls; required: calls only. `function` names the one function
    every call must be (it implies required). `parallel`: more than one call in an answer."""

    functions: tuple[Function, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    def __post_init__(self) -> None:
        if not self.functions or len(self.functions) > MAX_TOOLS:
            raise ProtocolError.about("tools.functions", f"takes 1 to {MAX_TOOLS} functions")
        names = [f.name for f in self.functions]
        if len(set(names)) != len(names):
            raise ProtocolError.about("tools.functions", "must have distinct names")
        if self.choice not in TOOL_CHOICES:
            raise ProtocolError.about("tools.choice",
                                      f"must be one of {', '.join(TOOL_CHOICES)}, got {_quote(self.choice)}")
        if self.function is not None and self.function not in names:
            raise ProtocolError.about("tools.function", f"names no function: {_quote(self.function)}")
        for function in self.functions:
            _canonical_json(function.parameters, "tools.functions")

    @property
    def calls_required(self) -> bool:
        return self.choice == "required" or self.function is not None

    @property
    def callable(self) -> tuple[Function, ...]:
        """The functions an answer may call."""
        return tuple(f for f in self.functions if self.function in (None, f.name))

    @property
    def key(self) -> str:
        """Equal tools give equal keys (compiled grammars are cached by it)."""
        return _canonical_json(self.to_fields(), "tools")

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"functions": [f.to_fields() for f in self.functions], "choice": self.choice,
                                  "parallel": self.parallel}
        if self.function is not None:
            fields["function"] = self.function
        return fields

    @classmethod
    def read(cls, value: Any) -> Tools | None:
        """A request's `tools` field: absent, built already (by a client in this process), or on the wire."""
        return value if value is None or isinstance(value, Tools) else cls.from_fields(value)

    @classmethod
    def from_fields(cls, value: Any) -> Tools:
        if not isinstance(value, dict):
            raise ProtocolError.about("tools", "must be a map")
        _reject_unknown(value, ("functions", "choice", "function", "parallel"), "tools")
        functions = value.get("functions")
        if not isinstance(functions, list):
            raise ProtocolError.about("tools.functions", "must be an array")
        choice, function, parallel = value.get("choice", "auto"), value.get("function"), value.get("parallel", True)
        if not isinstance(choice, str):
            raise ProtocolError.about("tools.choice", "must be a string")
        if function is not None and not isinstance(function, str):
            raise ProtocolError.about("tools.function", "must be a string")
        if not isinstance(parallel, bool):
            raise ProtocolError.about("tools.parallel", "must be a boolean")
        return cls(tuple(_function(index, f) for index, f in enumerate(functions)), choice, function, parallel)


def _function(index: int, value: Any) -> Function:
    name = f"tools.functions[{index}]"
    if not isinstance(value, dict):
        raise ProtocolError.about(name, "must be a map with 'name' and 'parameters'")
    _reject_unknown(value, ("name", "parameters", "description"), name)
    return Function.at(name, value.get("name"), value.get("parameters"), value.get("description"))
