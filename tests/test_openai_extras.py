"""`/tokenize`, `/detokenize` and vLLM's sampling extras through the HTTP API, as vLLM's own tools call them."""

from __future__ import annotations

import pytest

from tests.helpers import HELLO
from tests.test_openai_api import Api, post


@pytest.fixture(scope="module")
def api(bus):
    server = Api(bus.address).wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default_api(default_bus):
    server = Api(default_bus.address).wait()
    yield server
    server.stop()


def test_tokenize_counts_what_a_request_prefills(api, bus):
    client = api.client()
    status, chat = post(api.url + "/tokenize", {"model": bus.model, "messages": HELLO})
    answer = client.chat.completions.create(model=bus.model, messages=HELLO, max_tokens=1)
    assert status == 200 and chat["count"] == len(chat["tokens"]) == answer.usage.prompt_tokens
    assert chat["max_model_len"] == 512 and chat["token_strs"] is None
    status, prompt = post(api.url + "/tokenize", {"prompt": "The quick brown fox", "add_special_tokens": False})
    answer = client.completions.create(model=bus.model, prompt="The quick brown fox", max_tokens=1)
    assert status == 200 and prompt["count"] == answer.usage.prompt_tokens  # model left out: the one served
    status, text = post(api.url + "/detokenize", {"model": bus.model, "tokens": prompt["tokens"]})
    assert (status, text) == (200, {"prompt": "The quick brown fox"})


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "hi", "return_token_strs": True}, "return_token_strs"),
    ("/tokenize", {"messages": HELLO, "add_generation_prompt": False}, "add_generation_prompt"),
    ("/tokenize", {"messages": HELLO, "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"messages": "hi"}, "messages"),
    ("/tokenize", {"model": "no-such-model", "prompt": "hi"}, "model"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [10**12]}, "tokens"),
    ("/detokenize", {"tokens": "1 2 3"}, "tokens"),
])
def test_bad_token_requests_name_the_field(api, path, body, param):
    status, answer = post(api.url + path, body)
    assert status in (400, 404) and answer["error"]["param"] == param, answer


def test_vllm_sampling_extras_reach_the_worker(default_api, default_bus):
    client = default_api.client()
    ask = {"model": default_bus.model, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0,
           "max_tokens": 40}
    short = client.chat.completions.create(**ask)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    forced = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert (forced.choices[0].finish_reason, forced.usage.completion_tokens) == ("length", 40)
    longer = client.chat.completions.create(**ask, extra_body={"min_tokens": 30, "min_p": 0.05})
    assert longer.usage.completion_tokens >= 30
    count = {"model": default_bus.model, "prompt": "One, two, three,", "max_tokens": 8, "temperature": 0}
    free = client.completions.create(**count)
    _, tokens = post(default_api.url + "/tokenize", {"prompt": free.choices[0].text, "add_special_tokens": False})
    cut = client.completions.create(**count, extra_body={"stop_token_ids": [tokens["tokens"][0]]})
    assert (cut.choices[0].finish_reason, cut.choices[0].text, cut.usage.completion_tokens) == ("stop", "", 1)
    status, error = post(default_api.url + "/v1/chat/completions", {**ask, "min_tokens": 50})
    assert status == 400 and error["error"]["param"] == "min_tokens"


def test_tokenize_keeps_a_keys_model_limits(bus, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.other]\nsecret = "s1"\nmodels = ["another-model"]\n')
    server = Api(bus.address, "--keys-file", str(keys)).wait()
    try:
        status, body = post(server.url + "/tokenize", {"prompt": "hi"}, headers={"Authorization": "Bearer s1"})
        assert status == 403 and body["error"]["code"] == "model_not_allowed"
        status, body = post(server.url + "/tokenize", {"model": bus.model, "messages": HELLO,
                                                       "add_special_tokens": True},
                            headers={"Authorization": "Bearer s1"})
        assert status == 403  # named, it is refused before anything else
    finally:
        server.stop()
