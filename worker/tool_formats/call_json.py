"""A call as JSON, as every format writes it: the schema of a call to one function (for the grammar
of answers), and a call's arguments as the value templates write back."""

from __future__ import annotations

import json
from typing import Any

from broker.protocol import Function
from worker.json_schema import JSON_STYLE, closed_objects


def arguments_value(arguments: str) -> Any:
    """A call's arguments as a value, as templates write them back; text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_schema(function: Function, arguments_key: str, prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call to `function`, its arguments under `arguments_key`; the definitions
    its parameters refer to go to `definitions`, under `prefix`ed names."""
    parameters = _hoist_definitions(closed_objects(function.parameters), prefix, definitions)
    return {"type": "object", "additionalProperties": False, "required": ["name", arguments_key],
            "properties": {"name": {"const": function.name}, arguments_key: parameters}}


def _hoist_definitions(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` without its own `$defs` (or `definitions`), which move to `definitions` under
    `prefix`ed names, its `$ref`s rewritten to match: nested deep in the answer's schema, a reference
    like `#/$defs/Address` (as pydantic writes them) must still resolve from the root."""
    moved = {**parameters.get("$defs", {}), **parameters.get("definitions", {})}
    if not moved:
        return parameters

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            rewritten = {key: rewrite(value) for key, value in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        rewritten["$ref"] = "#/$defs/" + prefix + ref.removeprefix(root)
            return rewritten
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    def without_definitions(schema: dict[str, Any]) -> dict[str, Any]:
        """Only a schema's own `$defs` go: a property may well be called `definitions`."""
        return {key: value for key, value in schema.items() if key not in ("$defs", "definitions")}

    for name, definition in moved.items():
        definitions[prefix + name] = rewrite(without_definitions(definition) if isinstance(definition, dict)
                                             else definition)
    return rewrite(without_definitions(parameters))


def json_lexeme(schema: dict[str, Any]) -> str:
    """A Lark lexeme for JSON valid against `schema`, written in JSON_STYLE."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})
