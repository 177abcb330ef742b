"""Named keys with quotas over the real bus: 403 and 429 in each API's shape, reloads, usage per key."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.helpers import TINY_MODEL
from tests.processes import output_of
from tests.test_openai_api import Api

HELLO = [{"role": "user", "content": "Hello there"}]
SECRETS = {name: f"sk-{name}-5ecret" for name in ("alice", "bob", "carol", "dave", "erin", "frank")}

KEYS = f"""
[keys.alice]  # two requests a minute
secret = "{SECRETS['alice']}"
requests_per_minute = 2
models = ["{TINY_MODEL}"]
priority = 2

[keys.bob]  # another model only
secret = "{SECRETS['bob']}"
models = ["other"]

[keys.carol]  # one token a minute: the first request spends it
secret = "{SECRETS['carol']}"
tokens_per_minute = 1

[keys.frank]  # likewise, for a stream
secret = "{SECRETS['frank']}"
tokens_per_minute = 1

[keys.dave]  # one request at a time
secret = "{SECRETS['dave']}"
max_concurrent = 1
"""


def ask(server: Api, key: str, path: str = "/v1/chat/completions", **body) -> tuple[int, dict, dict]:
    """POST a small generation with `key`; its status, headers and JSON body."""
    fields = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 2, **body}
    request = urllib.request.Request(server.url + path, data=json.dumps(fields).encode(), headers={
        "Content-Type": "application/json", "x-api-key" if path.startswith("/v1/messages") else "Authorization":
        key if path.startswith("/v1/messages") else f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def metrics_text(server: Api) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        return response.read().decode()


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


@pytest.fixture
def server(bus, keys_file):
    running = Api(bus.address, "--keys-file", str(keys_file), "--api-keys", '["plain-key"]').wait()
    yield running
    running.stop()


def test_requests_per_minute_is_429_with_retry_after_in_each_apis_shape(server):
    for _ in range(2):
        status, _, _ = ask(server, SECRETS["alice"])
        assert status == 200
    status, headers, error = ask(server, SECRETS["alice"])
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    assert error["error"]["code"] == "rate_limit_exceeded" and "requests per minute" in error["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    status, headers, error = ask(server, SECRETS["alice"], "/v1/messages")
    assert status == 429 and error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["Retry-After"]) <= 60
    with pytest.raises(openai.RateLimitError):  # what OpenAI's client makes of it
        server.client(SECRETS["alice"]).chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=1)
    # other keys are counted apart, unnamed ones have no limits
    assert ask(server, SECRETS["dave"])[0] == 200
    assert all(ask(server, "plain-key")[0] == 200 for _ in range(3))


def test_a_model_the_key_may_not_use_is_403(server):
    status, _, error = ask(server, SECRETS["bob"])
    assert status == 403 and error["error"]["type"] == "permission_error"
    assert error["error"]["code"] == "model_not_allowed" and error["error"]["param"] == "model"
    status, _, error = ask(server, SECRETS["bob"], "/v1/messages")
    assert status == 403 and error["error"]["type"] == "permission_error"
    status, _, _ = ask(server, SECRETS["bob"], "/v1/completions", prompt="Hi", messages=None)
    assert status == 403
    status, _, error = ask(server, SECRETS["bob"], model="other")  # allowed, but not served
    assert status == 404 and error["error"]["code"] == "model_not_found"


def test_tokens_count_when_a_request_ends(server):
    status, _, body = ask(server, SECRETS["carol"], stream=False)
    assert status == 200 and body["usage"]["total_tokens"] > 1
    status, headers, error = ask(server, SECRETS["carol"])
    assert status == 429 and "tokens per minute" in error["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    # a stream is charged as well, when it ends
    with server.client(SECRETS["frank"]).chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2,
                                                                 stream=True) as stream:
        list(stream)
    status, _, error = ask(server, SECRETS["frank"], "/v1/messages")
    assert status == 429 and error["error"]["type"] == "rate_limit_error"


def test_max_concurrent_counts_open_streams(server):
    client = server.client(SECRETS["dave"])
    stream = client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=480, stream=True)
    next(iter(stream))
    status, headers, error = ask(server, SECRETS["dave"])
    assert status == 429 and "at once" in error["error"]["message"] and headers["Retry-After"] == "1"
    stream.close()  # the client leaves: the API cancels its request and frees the slot
    deadline = time.monotonic() + 30
    while ask(server, SECRETS["dave"])[0] != 200:
        assert time.monotonic() < deadline, "the slot of a closed stream was never freed"
        time.sleep(0.1)


def test_the_file_is_read_again_and_a_broken_one_keeps_the_last_good(server, keys_file):
    assert ask(server, SECRETS["erin"])[0] == 401
    keys_file.write_text(KEYS + f'\n[keys.erin]\nsecret = "{SECRETS["erin"]}"\n')
    assert ask(server, SECRETS["erin"])[0] == 200
    keys_file.write_text(KEYS + f'\n[keys.erin]\nsecret = "{SECRETS["erin"]}"\nrequests_per_min = 5\n')
    assert ask(server, SECRETS["erin"])[0] == 200  # kept
    assert "unknown fields requests_per_min" in output_of(server.process)
    os.unlink(keys_file)
    assert ask(server, SECRETS["erin"])[0] == 200
    keys_file.write_text(KEYS)  # erin removed
    assert ask(server, SECRETS["erin"])[0] == 401


def test_usage_per_key_name_and_no_secret_anywhere(server):
    assert ask(server, SECRETS["dave"])[0] == 200
    with server.client(SECRETS["dave"]).chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=3,
                                                                stream=True) as stream:
        list(stream)
    assert ask(server, SECRETS["bob"])[0] == 403
    assert ask(server, "sk-unknown")[0] == 401
    assert ask(server, "plain-key")[0] == 200
    text = metrics_text(server)
    assert 'tokenbus_api_key_requests_total{key=""} 1.0' in text  # keys from --api-keys have no name
    assert 'tokenbus_api_key_requests_total{key="dave"} 2.0' in text
    assert 'tokenbus_api_key_errors_total{key="bob",status="403"} 1.0' in text
    prompt = [line for line in text.splitlines() if line.startswith('tokenbus_api_key_prompt_tokens_total{key="dave"}')]
    assert prompt and float(prompt[0].split()[-1]) > 0
    completion = [line for line in text.splitlines()
                  if line.startswith('tokenbus_api_key_completion_tokens_total{key="dave"}')]
    assert completion and float(completion[0].split()[-1]) >= 3
    log = output_of(server.process)
    for secret in [*SECRETS.values(), "plain-key", "sk-unknown"]:
        assert secret not in text and secret not in log
