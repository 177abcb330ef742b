"""vLLM's sampling extras over the real bus on the default model, whose turns really end."""

from __future__ import annotations

import pytest

from frontends.client import BadRequest, BusClient

GREET = [{"role": "user", "content": "Say hello in five words."}]
GREEDY = {"temperature": 0, "max_tokens": 48}


def opening(text: str) -> list[str]:
    """An answer's first words. Greedy text is the same answer only up to a near tie: each request
    finds another share of its prompt cached, and bfloat16 products of another shape round otherwise."""
    return text.split()[:2]


async def _answer(client: BusClient, model: str, **params):
    return await (await client.chat(model, GREET, **{**GREEDY, **params})).collect()


async def test_ignore_eos_and_min_tokens_lengthen_a_short_answer(default_bus):
    model = default_bus.model
    async with BusClient(default_bus.address) as client:
        short = await _answer(client, model)
        assert short.finish_reason == "stop" and short.completion_tokens < 40  # the model ends its turn
        forced = await _answer(client, model, ignore_eos=True)
        assert (forced.finish_reason, forced.completion_tokens) == ("length", 48)
        assert opening(forced.text) == opening(short.text)
        # past its end of turn the model goes on; skip_special_tokens false shows the end-of-turn marker
        shown = await _answer(client, model, ignore_eos=True, skip_special_tokens=False)
        assert "<|im_end|>" in shown.text and "<|im_end|>" not in forced.text
        longer = await _answer(client, model, min_tokens=40)
        assert longer.completion_tokens >= 40 and opening(longer.text) == opening(short.text)


async def test_stop_token_ids_end_the_answer_with_or_without_their_text(default_bus):
    model = default_bus.model
    async with BusClient(default_bus.address) as client:
        full = await _answer(client, model)
        ids = list((await client.tokenize(model, prompt=full.text, add_special_tokens=False)).tokens)
        cut = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])  # a token's first appearance
        stopped = await _answer(client, model, stop_token_ids=[ids[cut]])
        assert stopped.finish_reason == "stop" and stopped.completion_tokens == cut + 1
        assert stopped.text == await client.detokenize(model, ids[:cut])
        kept = await _answer(client, model, stop_token_ids=[ids[cut]], include_stop_str_in_output=True)
        assert kept.text == await client.detokenize(model, ids[:cut + 1])


async def test_stop_strings_can_be_kept_and_wait_for_min_tokens(default_bus):
    model = default_bus.model
    async with BusClient(default_bus.address) as client:
        full = await _answer(client, model)
        word = full.text.split()[1]
        start = full.text.index(word)
        dropped = await _answer(client, model, stop=[word])
        kept = await _answer(client, model, stop=[word], include_stop_str_in_output=True)
        assert dropped.text == full.text[:start] and kept.text == full.text[:start + len(word)]
        # before min_tokens the stop string does not count: the answer runs past it
        late = await _answer(client, model, stop=[word], min_tokens=full.completion_tokens - 1)
        assert late.text.startswith(full.text[:start + len(word)]) and len(late.text) > start + len(word)


async def test_min_p_of_one_keeps_only_the_likeliest_tokens(default_bus):
    model = default_bus.model
    hot = {"temperature": 2.0, "seed": 7, "logprobs": True, "top_logprobs": 1}
    async with BusClient(default_bus.address) as client:
        free = await _answer(client, model, **hot)
        kept = await _answer(client, model, **hot, min_p=1.0)

    def likeliest(entry) -> bool:  # the token drawn is the likeliest one (or tied with it)
        return entry.logprob >= entry.top[0].logprob
    assert not all(map(likeliest, free.logprobs))
    assert all(map(likeliest, kept.logprobs))


@pytest.mark.parametrize("params, field", [
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
async def test_bad_extras_are_refused_naming_the_field(default_bus, params, field):
    async with BusClient(default_bus.address) as client:
        with pytest.raises(BadRequest) as error:
            await client.chat(default_bus.model, GREET, **params)
        assert field in str(error.value)
