"""Regenerate `schemas.json` from OpenAI's full OpenAPI spec:

    python tests/openai_spec/extract.py path/to/openapi.yaml

Keeps the schemas the tests validate against, with every schema they reference, so the suite
needs nothing outside the repository.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "ListModelsResponse", "Model",
    "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse", "CreateEmbeddingResponse", "ErrorResponse",
    "Response", "ResponseStreamEvent",
)
PREFIX = "#/components/schemas/"
TARGET = Path(__file__).with_name("schemas.json")


def _references(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(_references, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["$ref"][len(PREFIX):]} if isinstance(node.get("$ref"), str) else set()
    return found.union(*map(_references, node.values())) if node else found


def extract(spec: dict) -> dict:
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name not in kept:
            kept[name] = schemas[name]
            pending.extend(_references(schemas[name]) - kept.keys())
    info = spec["info"]
    return {
        "source": {"title": info["title"], "version": info["version"], "license": info["license"]["name"]},
        "schemas": dict(sorted(kept.items())),
    }


def main() -> None:
    spec = yaml.safe_load(Path(sys.argv[1]).read_text())
    TARGET.write_text(json.dumps(extract(spec), indent=1, sort_keys=False) + "\n")
    print(f"wrote {TARGET} ({len(extract(spec)['schemas'])} schemas)")


if __name__ == "__main__":
    main()
