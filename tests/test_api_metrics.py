"""The API's vLLM-style metrics over the real bus: the values each request adds."""

from __future__ import annotations

import urllib.request

from tests.helpers import TINY_MODEL
from tests.test_openai_api import Api

PROMPT = [{"role": "user", "content": "Tell me about the sea and the sky, at some length, please."}]


def samples(server: Api) -> dict[str, float]:
    """`name{labels}` -> value, from the API's /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_tokens_latencies_and_the_prefix_cache_by_model_name(bus):
    server = Api(bus.address).wait()
    try:
        client = server.client()
        first = client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=5,
                                               extra_body={"ignore_eos": True}).usage
        with client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}) as stream:
            second = [chunk.usage for chunk in stream if chunk.usage is not None][0]
        values = samples(server)
        label = f'{{model_name="{TINY_MODEL}"}}'
        assert values[f"tokenbus:prompt_tokens_total{label}"] == first.prompt_tokens + second.prompt_tokens
        assert values[f"tokenbus:generation_tokens_total{label}"] == 5 + 7
        assert values[f"tokenbus:prefix_cache_queries_total{label}"] == first.prompt_tokens + second.prompt_tokens
        # the same prompt again: the second found the first's KV in the worker's prefix cache
        cached = second.prompt_tokens_details.cached_tokens
        assert cached > 0 and values[f"tokenbus:prefix_cache_hits_total{label}"] == cached
        assert values[f"tokenbus:time_to_first_token_seconds_count{label}"] == 2
        assert values[f"tokenbus:e2e_request_latency_seconds_count{label}"] == 2
        # one observation per gap between two tokens: 4 and 6
        assert values[f"tokenbus:inter_token_latency_seconds_count{label}"] == 4 + 6
        assert values[f"tokenbus:inter_token_latency_seconds_sum{label}"] > 0
        # the broker's numbers, read at the scrape: nothing running or waiting now
        assert values[f"tokenbus:num_requests_running{label}"] == 0
        assert values[f"tokenbus:num_requests_waiting{label}"] == 0
        # the older names still count
        assert values[f'tokenbus_api_completion_tokens_total{{model="{TINY_MODEL}"}}'] == 12
    finally:
        server.stop()


def test_requests_running_come_from_the_broker(bus):
    server = Api(bus.address).wait()
    try:
        stream = server.client().chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=400,
                                                         stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        assert samples(server)[f'tokenbus:num_requests_running{{model_name="{TINY_MODEL}"}}'] == 1
        stream.close()
    finally:
        server.stop()
