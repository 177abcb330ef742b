"""JSON as constrained answers write it: the style of its text, and schemas closed to keys nobody
asked for. Shared by the grammar compiler and the tool formats, and free of torch and llguidance."""

from __future__ import annotations

from typing import Any

# The compact separators OpenAI's own structured outputs use; a flexible whitespace pattern would
# let a sampled row spend its tokens on blank lines. Constrained answers and tool calls are written so.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Keywords whose values are schemas, lists of schemas, or maps of names to schemas.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "additionalProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")  # not allOf: its parts describe one object together
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_objects(schema: Any) -> Any:
    """`schema` with every object that lists its properties, and says nothing of others, closed to
    them (as in OpenAI's strict mode and xgrammar's default): whatever it generates still validates
    against the schema as sent, and a sampled row does not wander off into keys nobody asked for."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(closed.get(key), dict):
            closed[key] = closed_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_objects(item) for item in closed[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_objects(item) for name, item in closed[key].items()}
    if isinstance(closed.get("properties"), dict) and not any(k in closed for k in _OPEN_KEYWORDS):
        closed["additionalProperties"] = False
    return closed
