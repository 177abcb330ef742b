"""TOKENIZE over the real bus: the tokens a REQUEST starts from, counted by the worker that would run it."""

from __future__ import annotations

import msgpack
import pytest

from broker.protocol import PROTOCOL_SIGNATURE
from frontends.client import BadRequest, BusClient, UnknownModel
from frontends.openai_api.tools import parse_tools
from tests.helpers import HELLO, raw_dealer

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


async def test_a_chat_counts_the_tokens_its_request_prefills(bus):
    async with BusClient(bus.address) as client:
        tokens = await client.tokenize(bus.model, messages=HELLO)
        answer = await (await client.chat(bus.model, HELLO, max_tokens=2)).collect()
        assert tokens.count == answer.prompt_tokens and tokens.max_model_len == 512
        # the chat template is applied: the text decoded from the ids shows the user's turn inside it
        text = await client.detokenize(bus.model, list(tokens.tokens))
        assert "Hello there" in text and text != "Hello there"


async def test_tools_are_counted_as_the_template_shows_them(bus):
    tools = parse_tools({"tools": [WEATHER]}).to_fields()
    async with BusClient(bus.address) as client:
        plain = await client.tokenize(bus.model, messages=HELLO)
        with_tools = await client.tokenize(bus.model, messages=HELLO, tools=tools)
        answer = await (await client.chat(bus.model, HELLO, tools=tools, max_tokens=2)).collect()
    assert with_tools.count == answer.prompt_tokens > plain.count


async def test_a_prompt_round_trips(bus):
    async with BusClient(bus.address) as client:
        tokens = await client.tokenize(bus.model, prompt="The quick brown fox")
        assert tokens.text == "" and tokens.count > 0
        assert await client.detokenize(bus.model, list(tokens.tokens)) == "The quick brown fox"
        answer = await (await client.complete(bus.model, "The quick brown fox", max_tokens=1)).collect()
        assert answer.prompt_tokens == tokens.count


async def test_bad_tokenize_requests_are_refused(bus):
    async with BusClient(bus.address) as client:
        with pytest.raises(UnknownModel):
            await client.tokenize("no-such-model", prompt="hi")
        with pytest.raises(BadRequest, match="token ids"):
            await client.detokenize(bus.model, [-1])
        with pytest.raises(BadRequest, match="cannot be decoded"):
            await client.detokenize(bus.model, [2**31 - 1])
        with pytest.raises(BadRequest, match="exactly one"):
            await client.tokenize(bus.model)
        # and the worker still serves
        assert (await client.tokenize(bus.model, prompt="hi")).count > 0


async def test_a_raw_client_tokenizes_with_the_documented_frames(bus):
    socket = raw_dealer(bus.address)
    try:
        await socket.send_multipart([PROTOCOL_SIGNATURE, b"TOKENIZE", b"r" * 16,
                                     msgpack.packb({"model": bus.model, "prompt": "Hello world"})])
        signature, command, request_id, body = await socket.recv_multipart()
        fields = msgpack.unpackb(body)
        assert (command, request_id) == (b"TOKENS", b"r" * 16)
        assert fields["max_model_len"] == 512 and all(isinstance(t, int) for t in fields["tokens"])
    finally:
        socket.close()
