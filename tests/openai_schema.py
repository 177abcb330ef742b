"""Validation of responses against the official OpenAI OpenAPI spec (../shared/openai/openapi.yaml)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.yaml"


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
    spec = yaml.safe_load(SPEC.read_text())
    return _allow_null(spec["components"])


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches components/schemas/<schema_name>."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    Draft202012Validator(schema).validate(instance)
