"""The OpenAI API over the real bus: the official `openai` client, raw HTTP, LangChain, and the spec."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.request

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from broker.protocol import SEED_RANGE
from frontends.openai_api.requests import parse_chat
from tests.helpers import TINY_MODEL, a_client_that_leaves_is_cancelled, serving
from tests.openai_schema import validate
from tests.processes import free_address, free_port, spawn, stop

HELLO = [{"role": "user", "content": "Hello there"}]


class Api:
    def __init__(self, broker: str, *args: str, context: ssl.SSLContext | None = None) -> None:
        """`context`: a client TLS context, for an API given a certificate in `args`."""
        self.port = free_port()
        self.context = context
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.port}"
        self.process = spawn("frontends.openai_api", "--broker", broker, "--port", str(self.port), *args,
                             log_name="api")

    def wait(self, status: int = 200) -> Api:
        for _ in range(300):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=10, context=self.context) as response:
                    if response.status == status:
                        return self
            except urllib.error.HTTPError as error:
                if error.code == status:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}/health never answered {status}")

    def client(self, key: str = "none") -> openai.OpenAI:
        http_client = httpx.Client(verify=self.context) if self.context else None
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, http_client=http_client)

    def stop(self) -> None:
        stop(self.process)


@pytest.fixture(scope="module")
def api(bus):
    server = Api(bus.address).wait()
    yield server
    server.stop()


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def sse_payloads(url: str, body: dict) -> list[str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]


# -- models and health


def test_models_come_from_the_broker(api):
    models = api.client().models.list()
    validate("ListModelsResponse", models.model_dump())
    assert [m.id for m in models.data] == [TINY_MODEL]
    validate("Model", api.client().models.retrieve(TINY_MODEL).model_dump())
    with pytest.raises(openai.NotFoundError, match=f"models served: {TINY_MODEL}"):
        api.client().models.retrieve("nope")


def test_health_and_metrics(api):
    with urllib.request.urlopen(api.url + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok", "models": [TINY_MODEL]}
    api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=3)
    api.client().models.list()
    with pytest.raises(openai.NotFoundError):
        api.client().chat.completions.create(model="made-up-name", messages=HELLO)
    with urllib.request.urlopen(api.url + "/metrics") as response:
        text = response.read().decode()
    assert "made-up-name" not in text, "a client's model string must not become a label"
    assert f'tokenbus_api_requests_total{{endpoint="/v1/chat/completions",model="{TINY_MODEL}",status="200"}}' in text
    assert 'tokenbus_api_requests_total{endpoint="/v1/models",model="",status="200"}' in text
    for name in ("tokenbus_api_prompt_tokens_total", "tokenbus_api_completion_tokens_total",
                 "tokenbus_api_time_to_first_token_seconds_bucket", "tokenbus_api_request_latency_seconds_bucket",
                 "tokenbus_api_requests_in_flight", "tokenbus_api_rejected_overloaded_total"):
        assert name in text


def test_system_fingerprint_names_the_worker_but_not_its_host(api, bus):
    worker_id = f"{socket.gethostname()}-{bus.workers[0].pid}"  # what the worker calls itself
    answers = [api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2)
               for _ in range(2)]
    stream = api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2, stream=True,
                                                  stream_options={"include_usage": True})
    prints = {answer.system_fingerprint for answer in answers} | {list(stream)[-1].system_fingerprint}
    assert len(prints) == 1, f"one worker, one fingerprint: {prints}"
    (fingerprint,) = prints
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fingerprint), fingerprint
    assert socket.gethostname() not in fingerprint and f"-{bus.workers[0].pid}" not in fingerprint
    assert worker_id not in fingerprint


# -- chat


def test_chat_completion_matches_the_spec(api):
    completion = api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=5, user="u1")
    body = completion.model_dump(exclude_unset=True)
    validate("CreateChatCompletionResponse", body)
    assert completion.id.startswith("chatcmpl-") and abs(completion.created - time.time()) < 600
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


def test_chat_stream_matches_the_spec_and_ends_with_done(api):
    body = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 6, "stream": True}
    payloads = sse_payloads(api.url + "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"] for c in chunks), "no usage-only chunk unless asked"
    with_usage = [json.loads(p) for p in sse_payloads(api.url + "/v1/chat/completions",
                                                      {**body, "stream_options": {"include_usage": True}})[:-1]]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in with_usage[:-1]), "as OpenAI: usage null until the last chunk"
    validate("CreateChatCompletionStreamResponse", with_usage[-1])


def test_official_client_streams_sync(api):
    stream = api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


async def test_official_client_async(api):
    client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0)
    completion = await client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=4)
    assert completion.usage.completion_tokens == 4
    stream = await client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=4, stream=True)
    pieces = [chunk async for chunk in stream]
    assert pieces[-1].choices[0].finish_reason == "length"
    await client.close()


def test_n_choices_and_seed(api):
    client = api.client()
    one = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, n=3, seed=11)
    again = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, n=3, seed=11)
    validate("CreateChatCompletionResponse", one.model_dump(exclude_unset=True))
    assert [c.index for c in one.choices] == [0, 1, 2]
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in one.choices}) > 1
    assert one.usage.completion_tokens == 24
    stream = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, n=2, seed=11, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in one.choices[:2]]


def test_stop_strings_and_max_tokens(api):
    client = api.client()
    full = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length"
    stop = text[len(text) // 2:][:3]
    cut = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]
    short = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_chat_logprobs(api):
    completion = api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                                      logprobs=True, top_logprobs=2)
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 4
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == completion.choices[0].message.content


# -- legacy completions


def test_text_completions(api):
    client = api.client()
    completion = client.completions.create(model=TINY_MODEL, prompt=["One", "Two"], max_tokens=4, n=2, logprobs=2)
    validate("CreateCompletionResponse", completion.model_dump(exclude_unset=True))
    assert completion.id.startswith("cmpl-") and [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.completion_tokens == 16
    assert all(len(c.logprobs.tokens) == 4 for c in completion.choices)
    for choice in completion.choices:  # offsets count from the end of the prompt, token after token
        offsets, tokens = choice.logprobs.text_offset, choice.logprobs.tokens
        assert offsets[0] == 3 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], tokens))
    single = client.completions.create(model=TINY_MODEL, prompt="One", max_tokens=4)
    assert single.usage.prompt_tokens * 2 <= completion.usage.prompt_tokens + 2
    payloads = sse_payloads(api.url + "/v1/completions", {"model": TINY_MODEL, "prompt": "One", "max_tokens": 3,
                                                          "stream": True, "logprobs": 1})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    streamed_offsets = [o for c in chunks[:-1] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert len(streamed_offsets) == 3 and streamed_offsets[0] == 3 and streamed_offsets == sorted(streamed_offsets)
    validate("CreateCompletionResponse", chunks[-1])
    for chunk in chunks[:-1]:
        # The spec has no stream schema for legacy completions; like OpenAI's own streams, chunks
        # before the last carry a null finish_reason. Everything else must match.
        assert [c["finish_reason"] for c in chunk["choices"]] == [None]
        validate("CreateCompletionResponse", {**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "stop"}]})


# -- errors


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"model": TINY_MODEL}, "messages"),
    ({"messages": HELLO}, "model"),
    ({"model": TINY_MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"model": TINY_MODEL, "messages": HELLO, "temperature": 9}, "temperature"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": TINY_MODEL, "messages": HELLO, "n": 0}, "n"),
    ({"model": TINY_MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": TINY_MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"model": TINY_MODEL, "messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"model": TINY_MODEL, "messages": HELLO, "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": TINY_MODEL, "messages": HELLO, "response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"model": TINY_MODEL, "messages": HELLO, "logit_bias": {"1": 5}}, "logit_bias"),
    ({"model": TINY_MODEL, "messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
    ({"model": TINY_MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": TINY_MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": TINY_MODEL, "messages": HELLO, "stream": True, "stream_options": []}, "stream_options"),
    ({"model": TINY_MODEL, "messages": HELLO, "stream": True, "stream_options": {"include_usage": "no"}},
     "stream_options.include_usage"),
    ({"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name"),
    ({"model": TINY_MODEL, "messages": HELLO, "user": 5}, "user"),
    ({"model": TINY_MODEL, "messages": HELLO, "seed": 2**70}, "seed"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 2**70}, "max_tokens"),
    ({"model": TINY_MODEL, "messages": HELLO, "temperature": 10**400}, "temperature"),
    (b'{"model": "tiny", "messages": [], "seed": 1' + b"1" * 5000 + b"}", None),
    (b"[" * 100_000, None),  # nested deeper than the JSON parser recurses
])
def test_bad_requests_get_400_naming_the_param(api, body, param):
    status, error = post(api.url + "/v1/chat/completions", body)
    assert status == 400, error
    validate("ErrorResponse", error)
    assert error["error"]["param"] == param


def test_a_schema_the_worker_cannot_compile_is_400_saying_why(api):
    for stream in (False, True):
        status, error = post(api.url + "/v1/chat/completions", {
            "model": TINY_MODEL, "messages": HELLO, "stream": stream, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 3,
                                                                              "maxLength": 1}}}})
        assert status == 400 and error["error"]["param"] == "response_format", error  # the worker names the field
        validate("ErrorResponse", error)
        assert "cannot be compiled" in error["error"]["message"] and "minLength" in error["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": TINY_MODEL, "prompt": ""}, "prompt"),
    ({"model": TINY_MODEL, "prompt": ["One", ""]}, "prompt"),
    ({"model": TINY_MODEL, "prompt": "One", "echo": True}, "echo"),
    ({"model": TINY_MODEL, "prompt": "One", "best_of": True}, "best_of"),
    ({"model": TINY_MODEL, "prompt": "One", "suffix": "!"}, "suffix"),
    ({"model": TINY_MODEL, "prompt": ["One"] * 9, "n": 2}, "n"),  # 18 bus requests: more than --max-n
])
def test_bad_text_completions_get_400(api, body, param):
    status, error = post(api.url + "/v1/completions", body)
    assert status == 400, error
    validate("ErrorResponse", error)
    assert error["error"]["param"] == param


def test_the_body_is_read_as_utf8_whatever_charset_the_header_names(api):
    # RFC 8259 defines no charset parameter for application/json: JSON between systems is UTF-8.
    status, body = post(api.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 1},
                        headers={"Content-Type": "application/json; charset=bogus"})
    assert status == 200, body
    status, error = post(api.url + "/v1/chat/completions", b'{"model": "\xff"}')  # not UTF-8
    assert status == 400 and error["error"]["code"] == "invalid_json"


def test_n_choices_near_the_largest_seed_wrap_around_inside_the_range(api):
    low, high = SEED_RANGE
    call = parse_chat({"model": TINY_MODEL, "messages": HELLO, "n": 3, "seed": high - 1}, max_n=8)
    assert [r.seed for r in call.requests] == [high - 1, high, low]
    status, body = post(api.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 1,
                                                           "n": 2, "seed": high})
    assert status == 200 and len(body["choices"]) == 2, body


def test_harmless_values_of_unsupported_fields_are_accepted(api):
    status, body = post(api.url + "/v1/completions", {"model": TINY_MODEL, "prompt": "One", "max_tokens": 2,
                                                      "echo": False, "best_of": 1, "suffix": None})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body = post(api.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 2,
                                                           "top_logprobs": 0})
    assert status == 200
    # bookkeeping fields, a participant's name, and plain text as the response format change nothing
    status, body = post(api.url + "/v1/chat/completions", {
        "model": TINY_MODEL, "messages": [{"role": "user", "content": "Hello there", "name": "alice"}], "max_tokens": 2,
        "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "response_format": {"type": "text"}})
    assert status == 200, body


def test_prompt_over_the_context_is_400_naming_the_input(api):
    client = api.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "hi " * 600}],
                                           stream=stream)
        assert (error.value.code, error.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=TINY_MODEL, prompt="hi " * 600)
    assert (error.value.code, error.value.param) == ("context_length_exceeded", "prompt")


def test_unknown_model_is_404_listing_models(api):
    with pytest.raises(openai.NotFoundError, match=f"models served: {TINY_MODEL}"):
        api.client().chat.completions.create(model="nope", messages=HELLO)


def test_body_over_the_limit_is_413(bus):
    server = Api(bus.address, "--max-body-bytes", "2048").wait()
    try:
        status, error = post(server.url + "/v1/chat/completions",
                             {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert status == 413
        validate("ErrorResponse", error)
    finally:
        server.stop()


def test_api_keys_and_cors(bus):
    server = Api(bus.address, "--api-keys", '["k1","k2"]', "--cors-origins", '["http://app.example"]').wait()
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("k2").models.list().data[0].id == TINY_MODEL
        status, error = post(server.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO})
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
        # A key that is not UTF-8 (urllib sends the header as Latin-1) is just a wrong key.
        status, error = post(server.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO},
                             headers={"Authorization": "Bearer k\xff"})
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
        preflight = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(preflight) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "http://app.example"
        # Errors carry the CORS headers too, or a browser could not read why it failed.
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{}", headers={
            "Origin": "http://app.example", "Authorization": "Bearer k1", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request)
        assert error.value.code == 400 and error.value.headers["Access-Control-Allow-Origin"] == "http://app.example"
        with urllib.request.urlopen(server.url + "/health") as response:  # open without a key
            assert response.status == 200
    finally:
        server.stop()


def test_no_broker_is_503():
    server = Api(free_address()).wait(status=503)
    try:
        with pytest.raises(openai.InternalServerError) as error:
            server.client().chat.completions.create(model=TINY_MODEL, messages=HELLO)
        assert error.value.status_code == 503
    finally:
        server.stop()


def test_overload_is_429(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL, "--max-batch", "1") as running:
        stop(running.broker)
        running.broker = spawn("broker", "--bind", running.address, "--max-queue", "0", log_name="broker")
        server = Api(running.address).wait()
        try:
            client = server.client()
            long_stream = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=480, stream=True)
            next(iter(long_stream))
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2)
            long_stream.close()
            with urllib.request.urlopen(server.url + "/metrics") as response:
                text = response.read().decode()
            assert f'tokenbus_api_rejected_overloaded_total{{model="{TINY_MODEL}"}} 1.0' in text
            assert (f'tokenbus_api_requests_total{{endpoint="/v1/chat/completions",model="{TINY_MODEL}",'
                    f'status="429"}} 1.0') in text
        finally:
            server.stop()


def test_worker_death_mid_stream_is_an_error_event(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL) as running:
        server = Api(running.address).wait()
        try:
            stream = server.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=480,
                                                             stream=True)
            chunks = iter(stream)
            next(chunks)
            os.kill(running.workers[0].pid, signal.SIGKILL)
            with pytest.raises(openai.APIError, match="lost"):
                for _ in chunks:
                    pass
        finally:
            server.stop()


async def test_client_disconnect_cancels_the_bus_request(api, bus):
    await a_client_that_leaves_is_cancelled(api.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 480, "stream": True}, bus.address)


# -- LangChain


def test_langchain_chat_openai(api):
    chat = ChatOpenAI(base_url=api.url + "/v1", api_key="none", model=TINY_MODEL, max_tokens=6, temperature=0,
                      max_retries=0)
    answer = chat.invoke("Hello there")
    assert answer.content and answer.response_metadata["finish_reason"] == "length"
    streamed = "".join(chunk.content for chunk in chat.stream("Hello there"))
    assert streamed == answer.content
