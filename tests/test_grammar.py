"""Constrained decoding in the worker: grammars, masks, and constrained rows beside free ones."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from broker.protocol import Constraint, FinishReason, GenerationRequest, ProtocolError
from broker.settings import load_settings
from tests.test_default_model import PROMPTS, run_engine
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine_api import DoneEvent, ErrorEvent, TokenEvent
from worker.grammar import GrammarCompiler, closed_objects, mask_logits
from worker.model_source import default_model_dir

pytestmark = pytest.mark.slow  # the default model's tokenizer, and its weights for the engine

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    return GrammarCompiler(tokenizer, frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>")}))


def test_the_mask_allows_exactly_what_the_grammar_allows(compiler):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    row = compiler.start(Constraint("json_schema", PERSON))
    scores = mask_logits(torch.zeros(3, compiler.vocab_size), [1], [row])
    assert torch.isfinite(scores[0]).all() and torch.isfinite(scores[2]).all()  # free rows untouched
    allowed = [tokenizer.decode([t]) for t in torch.isfinite(scores[1]).nonzero().flatten().tolist()]
    assert allowed and all('{"name": "'.startswith(text) for text in allowed), allowed[:20]
    for token in tokenizer.encode('{"name": "Al", "age": 7}'):
        assert torch.isfinite(mask_logits(torch.zeros(1, compiler.vocab_size), [0], [row])[0, token])
        row.advance(token)
    assert row.complete


def test_grammars_are_cached_by_schema(compiler):
    first = compiler.compiled(Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "string"}}}))
    again = compiler.compiled(Constraint("json_schema", {"properties": {"a": {"type": "string"}}, "type": "object"}))
    assert first is again
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    row, other = (compiler.start(Constraint("json_schema", schema)) for _ in "ab")
    assert row.matcher.compute_ff_bytes() == b'{"a": "'
    for token in compiler.tokenizer.tokenize_str('{"a": "x'):  # each row moves on its own
        row.advance(token)
    assert other.matcher.compute_ff_bytes() == b'{"a": "' and row.matcher.compute_ff_bytes() == b""
    assert not row.complete


@pytest.mark.parametrize("schema, reason", [
    ({"type": "nothing"}, "Invalid type"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"$ref": "#/definitions/missing"}, "does not exist"),
])
def test_a_schema_that_cannot_compile_says_why(compiler, schema, reason):
    with pytest.raises(ProtocolError, match=reason) as caught:
        compiler.start(Constraint("json_schema", schema))
    assert caught.value.field == "constraint.schema"


@pytest.fixture(scope="module")
def engine():
    return build_engine(load_settings(WorkerSettings, ["--dtype", "float32"]))[0]


def _collect(engine, bodies: dict[bytes, dict]) -> tuple[dict[bytes, str], dict[bytes, object]]:
    texts, ends = {rid: "" for rid in bodies}, {}
    for rid, body in bodies.items():
        ends.update({e.request_id: e for e in engine.add(rid, GenerationRequest.from_fields({"model": "m", **body}))})
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, TokenEvent):
                texts[event.request_id] += event.delta.text
            else:
                ends[event.request_id] = event
    return texts, ends


def test_free_rows_read_the_same_beside_constrained_rows(engine):
    free = {rid: PROMPTS[rid] for rid in (b"a" * 16, b"c" * 16, b"d" * 16)}
    join_after = {b"d" * 16: 3}
    alone = run_engine(engine, free, join_after, 16)
    constrained = {bytes([i]) * 16: {"constraint": {"type": "json_schema", "schema": PERSON}} for i in range(3)}
    prompts = {**free, **{rid: "Describe a person as JSON." for rid in constrained}}
    params = {rid: {**body, "temperature": 1.0, "seed": i} for i, (rid, body) in enumerate(constrained.items())}
    mixed = run_engine(engine, prompts, {**join_after, bytes([2]) * 16: 2}, 16, params)
    assert {rid: mixed[rid] for rid in free} == alone
    for rid in constrained:  # 16 tokens may cut one short: then it is no JSON yet
        try:
            jsonschema.validate(json.loads(mixed[rid]), PERSON)
        except json.JSONDecodeError:
            assert mixed[rid].startswith('{"name": "'), mixed[rid]


def test_a_constrained_row_ends_where_its_grammar_does_or_says_length(engine):
    body = {"messages": [{"role": "user", "content": "A person, as JSON."}], "temperature": 0}
    texts, ends = _collect(engine, {
        b"w" * 16: {**body, "constraint": {"type": "json_schema", "schema": PERSON}, "max_tokens": 40},
        b"o" * 16: {**body, "constraint": {"type": "json_object"}, "max_tokens": 40},
        b"c" * 16: {**body, "constraint": {"type": "json_schema", "schema": PERSON}, "max_tokens": 3},
        b"x" * 16: {**body, "constraint": {"type": "json_schema", "schema": {"type": "nothing"}}},
    })
    jsonschema.validate(json.loads(texts[b"w" * 16]), PERSON)
    assert ends[b"w" * 16].done.finish_reason == FinishReason.STOP
    if ends[b"o" * 16].done.finish_reason == FinishReason.STOP:  # greedy, a small model may ramble in a key
        assert isinstance(json.loads(texts[b"o" * 16]), dict)
    else:
        assert ends[b"o" * 16].done.completion_tokens == 40
    assert ends[b"c" * 16].done.finish_reason == FinishReason.LENGTH
    assert isinstance(ends[b"x" * 16], ErrorEvent) and "Invalid type" in ends[b"x" * 16].error.message
    assert isinstance(ends[b"w" * 16], DoneEvent)


def test_objects_that_list_their_properties_are_closed():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "free": {"type": "object"},
        "open": {"type": "object", "properties": {"c": {}}, "additionalProperties": True},
        "list": {"type": "array", "items": {"anyOf": [{"type": "object", "properties": {"d": {}}}]}},
        "data": {"const": {"properties": {}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False and "additionalProperties" not in props["free"]
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["anyOf"][0]["additionalProperties"] is False
    assert props["data"] == {"const": {"properties": {}}}  # a value, not a schema: untouched
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


def test_a_token_its_grammar_refuses_fails_that_row_alone(engine, monkeypatch):
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4}
    refusing = {"constraint": {"type": "json_schema", "schema": PERSON}}
    original = engine.runner.sampler.sample

    def without_mask(logits, sequences):  # as if the mask had let a forbidden token through
        grammars = [s.grammar for s in sequences]
        for s in sequences:
            s.grammar = None
        try:
            return original(logits, sequences)
        finally:
            for s, grammar in zip(sequences, grammars):
                s.grammar = grammar

    monkeypatch.setattr(engine.runner.sampler, "sample", without_mask)
    texts, ends = _collect(engine, {b"r" * 16: {**body, **refusing}, b"f" * 16: body})
    assert isinstance(ends[b"r" * 16], ErrorEvent) and "refused" in ends[b"r" * 16].error.message
    assert isinstance(ends[b"f" * 16], DoneEvent) and ends[b"f" * 16].done.completion_tokens == 4
    assert not engine.has_work
