"""Prompts from the real default model's tokenizer and its own chat template."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from broker.protocol import GenerationRequest, ProtocolError
from worker.model_source import default_model_dir
from worker.prompt import PromptEncoder

# The rule some models' templates enforce (Llama 2, Mistral): user and assistant take turns.
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
               "{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def chat(*contents: str) -> GenerationRequest:
    return GenerationRequest.from_fields({"model": "m", "messages": [{"role": "user", "content": c} for c in contents]})


def test_chat_uses_the_models_own_template(tokenizer):
    ids = PromptEncoder(tokenizer, tokenizer.eos_token_id).encode(chat("Hi"))
    assert tokenizer.decode(ids) == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by " \
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_messages_the_template_refuses_are_the_callers_error(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ALTERNATING
    encoder = PromptEncoder(strict, tokenizer.eos_token_id)
    assert encoder.encode(chat("a")) == strict("a", add_special_tokens=False).input_ids
    with pytest.raises(ProtocolError, match="roles must alternate") as error:
        encoder.encode(chat("a", "b"))
    assert error.value.field == "messages"


@pytest.mark.parametrize("content", ["message['content']", "message['content'] | trim"])
def test_the_end_of_turn_token_comes_from_the_template_when_eos_is_another(tokenizer, content):
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"  # as some fine-tunes ship it: EOS is not the end of a turn
    other.chat_template = tokenizer.chat_template.replace("message['content']", content)
    encoder = PromptEncoder(other, other.eos_token_id)
    assert encoder.stop_token_ids == {other.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_a_participants_name_reaches_templates_that_show_it(tokenizer):
    named = copy.deepcopy(tokenizer)
    named.chat_template = "{% for m in messages %}{{ m['name'] ~ ': ' if m['name'] is defined }}{{ m['content'] }}\n{% endfor %}"
    request = GenerationRequest.from_fields({"model": "m", "messages": [
        {"role": "user", "content": "Hi", "name": "alice"}, {"role": "user", "content": "Hello"}]})
    assert named.decode(PromptEncoder(named, tokenizer.eos_token_id).encode(request)) == "alice: Hi\nHello\n"
    plain = PromptEncoder(tokenizer, tokenizer.eos_token_id)  # SmolLM2's template: the name is not shown
    assert plain.encode(request) == plain.encode(chat("Hi", "Hello"))
