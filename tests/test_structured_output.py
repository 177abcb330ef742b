"""Structured output and tool calls on the default model, through the API: the official client's
`parse`, LangChain, and many schemas sampled at once in one batch."""

from __future__ import annotations

import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.openai_schema import validate
from tests.test_openai_api import Api
from worker.model_source import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)
    capital: bool


PARIS = [{"role": "user", "content": "Describe the city of Paris as JSON."}]
WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def api(default_bus):
    server = Api(default_bus.address).wait()
    yield server
    server.stop()


def _parse(client: openai.OpenAI, temperature: float, stream: bool, seed: int) -> City:
    params = dict(model=DEFAULT_MODEL_NAME, messages=PARIS, response_format=City, temperature=temperature,
                  max_tokens=80, seed=seed)
    if stream:
        with client.chat.completions.stream(**params) as events:
            for _ in events:
                pass
            completion = events.get_final_completion()
    else:
        completion = client.chat.completions.parse(**params)
    assert completion.choices[0].finish_reason == "stop"
    return completion.choices[0].message.parsed


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_parses_a_pydantic_model_every_time(api, stream):
    client = api.client()
    runs = [(0.0, 0)] + [(1.0, seed) for seed in range(3)]
    with ThreadPoolExecutor(len(runs)) as pool:  # together, so they share the worker's batch
        cities = list(pool.map(lambda run: _parse(client, run[0], stream, run[1]), runs))
    assert all(isinstance(city, City) for city in cities)


def _schemas() -> list[dict]:
    """Fifty schemas, each a different mix of the shapes JSON schema offers, whose valid values are short."""
    word = {"type": "string", "maxLength": 12}
    leaves = [
        word,
        {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$", "maxLength": 24},
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"enum": [1, 2, 3, "many"]},
        {"type": "integer", "minimum": 0, "maximum": 100},
        {"type": "integer", "minimum": -50, "maximum": 50},
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "boolean"},
        {"const": "fixed"},
        {"type": ["string", "null"], "maxLength": 8},
        {"type": "string", "format": "date"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
        {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 2},
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]},
    ]
    rng = random.Random(13)
    schemas = []
    for number in range(50):
        keys = rng.sample(["id", "name", "kind", "size", "tags", "ok", "code", "score", "note"], rng.randint(1, 4))
        properties = {key: rng.choice(leaves) for key in keys}
        if number % 3 == 0:  # a nested object
            properties["inner"] = {"type": "object", "properties": {"x": rng.choice(leaves), "y": rng.choice(leaves)},
                                   "required": ["x"], "additionalProperties": False}
        if number % 5 == 0:  # an array of objects, bounded
            properties["items"] = {"type": "array", "maxItems": 2, "items": {
                "type": "object", "properties": {"k": rng.choice(leaves)}, "required": ["k"],
                "additionalProperties": False}}
        required = [key for key in properties if rng.random() < 0.7] or [next(iter(properties))]
        schemas.append({"type": "object", "properties": properties, "required": required,
                        "additionalProperties": False})
    return schemas


def test_fifty_schemas_sampled_together_all_validate(api):
    schemas = _schemas()

    async def ask(client: openai.AsyncOpenAI, number: int, schema: dict) -> tuple[str, str]:
        async with slots:  # the worker's capacity: more would wait in the broker's queue, against its timeout
            response = await client.chat.completions.create(
                model=DEFAULT_MODEL_NAME, temperature=1.0, max_tokens=64, seed=number,
                messages=[{"role": "user", "content": "Reply with a short example record as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": f"s{number}", "schema": schema,
                                                                        "strict": True}})
        validate("CreateChatCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
        return response.choices[0].finish_reason, response.choices[0].message.content

    slots = asyncio.Semaphore(16)

    async def ask_all() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(ask(client, n, s) for n, s in enumerate(schemas)))

    answers = asyncio.run(ask_all())
    cut = [text for reason, text in answers if reason == "length"]
    print(f"{len(cut)} of {len(answers)} cut by max_tokens:", cut)
    for (reason, text), schema in zip(answers, schemas):
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:
            assert reason == "length", reason
    assert len(cut) <= 2, cut  # a cut is a valid outcome, but it must be rare


def test_tool_calls_streamed_and_not_match_the_spec(api):
    body = dict(model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=60, tools=WEATHER_TOOLS, tool_choice="required",
                messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    client = api.client()
    whole = client.chat.completions.create(**body, parallel_tool_calls=False)
    validate("CreateChatCompletionResponse", whole.model_dump(mode="json", exclude_unset=True))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "add")
    arguments = json.loads(call.function.arguments)
    schema = next(t["function"]["parameters"] for t in WEATHER_TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(arguments, schema)

    chunks = list(client.chat.completions.create(**body, parallel_tool_calls=False, stream=True))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == call.function.name and deltas[0].function.arguments == ""
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_tool_choice_calls_that_tool(api):
    response = api.client().chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=1.0, max_tokens=60, tools=WEATHER_TOOLS, seed=3,
        tool_choice={"type": "function", "function": {"name": "add"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOLS[1]["function"]["parameters"])


def _chat(api: Api, **params) -> ChatOpenAI:
    return ChatOpenAI(base_url=api.url + "/v1", api_key="none", model=DEFAULT_MODEL_NAME, max_retries=0, **params)


def test_langchain_structured_output_returns_the_model(api):
    structured = _chat(api, temperature=0, max_tokens=80).with_structured_output(City)
    city = structured.invoke([HumanMessage(content="Describe the city of Paris as JSON.", name="alice")])
    assert isinstance(city, City)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny and 21 degrees in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_langchain_tools_round_trip(api):
    chat = _chat(api, temperature=0, max_tokens=80).bind_tools([get_weather, add], tool_choice="get_weather")
    question = HumanMessage(content="What is the weather in Paris?")
    asked = chat.invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = _chat(api, temperature=0, max_tokens=60).bind_tools([get_weather, add], tool_choice="none").invoke(
        [question, asked, result])
    assert answer.content and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_langchain_auto_tool_choice_gives_a_call_or_an_answer(api):
    chat = _chat(api, temperature=0, max_tokens=80).bind_tools([get_weather, add], parallel_tool_calls=False)
    reply = chat.invoke("Add 2 and 3 with the add tool.")
    if reply.tool_calls:
        assert reply.tool_calls[0]["name"] in ("get_weather", "add")
        assert reply.response_metadata["finish_reason"] == "tool_calls"
    else:
        assert reply.content and reply.response_metadata["finish_reason"] in ("stop", "length")
