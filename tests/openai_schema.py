"""Validation of responses against the official OpenAI OpenAPI spec.

The schemas used here, with all they reference, are kept in `openai_spec/schemas.json`
(regenerated from the full spec by `openai_spec/extract.py`; the spec's version and licence are
recorded in the file and in `openai_spec/README.md`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parent / "openai_spec" / "schemas.json"


def _allow_null(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true`, still found in the 3.1 spec, as JSON Schema's null type."""
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _allow_null(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _components() -> dict:
    return {"schemas": _allow_null(json.loads(SCHEMAS.read_text())["schemas"])}


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches components/schemas/<schema_name>."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    Draft202012Validator(schema).validate(instance)
