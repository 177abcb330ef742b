"""OpenAI request bodies to bus requests. Ranges and types of sampling fields are checked once,
by `GenerationRequest`; this module checks the OpenAI-only fields and the shape of the body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.protocol import SEED_RANGE, GenerationRequest, ProtocolError
from frontends.openai_api.body import object_body
from frontends.openai_api.errors import CHAT_FIELD_NAMES, bad_request, in_api_terms
from frontends.openai_api.tools import assistant_calls, parse_tools

# vLLM's sampling extras, which benchmark and eval tools send; the bus carries them as they are
VLLM_SAMPLING_FIELDS = ("min_p", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                        "skip_special_tokens", "spaces_between_special_tokens")
# How the bus treats the request: its place in the queue and its time limit in seconds
SERVICE_FIELDS = ("priority", "timeout")
_COMMON_FIELDS = {
    "model", "temperature", "top_p", "stop", "n", "seed", "presence_penalty", "frequency_penalty", "stream",
    "stream_options", "logprobs", "user", "max_tokens", "top_k", "repetition_penalty", *VLLM_SAMPLING_FIELDS,
    *SERVICE_FIELDS,
}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                "tool_choice", "parallel_tool_calls"}
# Accepted and dropped: they ask for bookkeeping on OpenAI's side and never change the output.
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
                    "repetition_penalty", *VLLM_SAMPLING_FIELDS, *SERVICE_FIELDS)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
MAX_LEGACY_LOGPROBS = 5


@dataclass(frozen=True, slots=True)
class ApiCall:
    """A parsed request: the bus requests to send (one per choice), and how to answer."""

    model: str
    input_param: str  # "messages" or "prompt": the field an error about the input names
    requests: list[GenerationRequest]  # n per prompt, prompt after prompt
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool


def parse_chat(body: Any, max_n: int) -> ApiCall:
    body = object_body(body, CHAT_FIELDS, IGNORED_FIELDS)
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    tools = parse_tools(body)
    constraint = format_constraint(body.get("response_format", {"type": "text"}), "response_format", "json_schema")
    messages = _messages(_required(body, "messages", list))
    fields = {
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "logprobs": bool(body.get("logprobs")),
        "top_logprobs": body.get("top_logprobs"),
        "constraint": constraint,
        "tools": tools,  # built once: the bus request takes it as it is
    }
    max_tokens_param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _call(body, "messages", [fields], max_n, {**CHAT_FIELD_NAMES, "max_tokens": max_tokens_param})


def format_constraint(value: Any, param: str, schema_key: str | None) -> dict[str, Any] | None:
    """The bus constraint for an output format (`param`: the field it came in); None for plain text.
    A json_schema's name, schema and strict sit under `schema_key` (chat's `response_format`), or beside
    its type when `schema_key` is None (the Responses API's `text.format`)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(f"'{param}.type' must be text, json_object or json_schema", param)
    spec, where = (value.get(schema_key), f"{param}.{schema_key}") if schema_key else (value, param)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request(f"'{where}' must be an object with a 'name'", where)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"'{where}.strict' must be a boolean", f"{where}.strict")
    schema = spec.get("schema")
    if schema is None:
        return {"type": "json_object"}
    if not isinstance(schema, dict):
        raise bad_request(f"'{where}.schema' must be a JSON schema object", f"{where}.schema")
    # strict or not, the output always validates: it is constrained to the schema as given
    return {"type": "json_schema", "schema": schema}


def parse_completion(body: Any, max_n: int) -> ApiCall:
    body = object_body(body, COMPLETION_FIELDS, IGNORED_FIELDS)
    # Accepted only at the values that ask for nothing (null was dropped already).
    for param, harmless in (("echo", False), ("suffix", ""), ("best_of", 1)):
        if param in body and not (type(body[param]) is type(harmless) and body[param] == harmless):
            raise bad_request(f"'{param}' is not supported", param, "unsupported_parameter")
    prompts = _required(body, "prompt", (str, list))
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise bad_request("'prompt' must be a non-empty string or a non-empty array of them", "prompt")
    top = body.get("logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LEGACY_LOGPROBS):
        raise bad_request(f"'logprobs' must be an integer from 0 to {MAX_LEGACY_LOGPROBS}", "logprobs")
    per_prompt = [{"prompt": p, "max_tokens": body.get("max_tokens", 16), "logprobs": top is not None,
                   "top_logprobs": top or 0} for p in prompts]
    return _call(body, "prompt", per_prompt, max_n)


def _call(body: dict, input_param: str, per_input: list[dict], max_n: int,
          field_names: Mapping[str, str] = CHAT_FIELD_NAMES) -> ApiCall:
    model = _required(body, "model", str)
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise bad_request(f"'n' must be an integer from 1 to {max_n}", "n")
    if n * len(per_input) > max_n:  # every choice of every prompt is a request on the bus
        raise bad_request(f"{len(per_input)} prompts x n={n} choices is more than {max_n} in one request", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    if not isinstance(body.get("user", ""), str):
        raise bad_request("'user' must be a string", "user", "invalid_type")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("'stream_options' must be an object with only 'include_usage'", "stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    stop = body.get("stop")
    sampling = {k: body[k] for k in _SAMPLING_FIELDS if k in body}
    sampling["stop"] = [stop] if isinstance(stop, str) else stop
    seed = sampling.get("seed")
    has_seed = isinstance(seed, int) and not isinstance(seed, bool)
    requests = []
    for fields in per_input:
        for choice in range(n):
            # n choices with one seed must still differ, and stay reproducible
            seeded = {"seed": _choice_seed(seed, choice)} if has_seed else {}
            requests.append(generation_request({"model": model, **sampling, **fields, **seeded}, field_names))
    return ApiCall(model, input_param, requests, n, stream, bool(options.get("include_usage")), requests[0].logprobs)


def _choice_seed(seed: int, choice: int) -> int:
    """The seeds after `seed`, wrapping around inside SEED_RANGE, so any valid seed works with any n."""
    if choice == 0:
        return seed  # as given: a seed out of range is refused, not wrapped
    low, high = SEED_RANGE
    return (seed + choice - low) % (high - low + 1) + low


def generation_request(fields: dict, field_names: Mapping[str, str] = CHAT_FIELD_NAMES) -> GenerationRequest:
    """The bus request, its errors naming the API's fields (`field_names`: bus field -> API field)."""
    try:
        return GenerationRequest.from_fields(fields)
    except ProtocolError as exc:
        error = in_api_terms(exc, field_names)
        raise bad_request(str(error), error.field) from None


def _required(body: dict, name: str, kind: type | tuple) -> Any:
    if name not in body:
        raise bad_request(f"'{name}' is required", name, "missing_required_parameter")
    if not isinstance(body[name], kind):
        raise bad_request(f"'{name}' has the wrong type", name, "invalid_type")
    return body[name]


def _messages(messages: list) -> list[dict[str, Any]]:
    """The chat as the bus carries it: a participant's `name`, an assistant's calls and a tool
    result's call id passed on (a tool result also named after the call it answers)."""
    called: dict[str, str] = {}  # tool call id -> function name, for the results that follow
    chat = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object", param, "invalid_type")
        role = _ROLES.get(message.get("role"))
        if role is None:
            raise bad_request(f"{param}.role must be one of system, developer, user, assistant, tool",
                              f"{param}.role")
        extra = sorted(set(message) - _MESSAGE_FIELDS)
        if extra:
            raise bad_request(f"{param}.{extra[0]} is not supported by this server", f"{param}.{extra[0]}",
                              "unsupported_parameter")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}", "invalid_type")
        entry: dict[str, Any] = {"role": role}
        if message.get("tool_calls") and role == "assistant":
            calls = assistant_calls(message["tool_calls"], f"{param}.tool_calls")
            called.update({call.id: call.name for call in calls})
            entry["tool_calls"] = [call.to_fields() for call in calls]
            entry["content"] = "" if message.get("content") is None else _content(message["content"], f"{param}.content")
        elif role == "assistant" and message.get("content") is None:
            entry["content"] = ""  # an assistant turn with neither text nor calls (some clients send it)
        else:
            entry["content"] = _content(message.get("content"), f"{param}.content")
        name = message.get("name")
        if role == "tool":
            if message.get("tool_call_id") is None:
                raise bad_request(f"{param}.tool_call_id is required in a tool message", f"{param}.tool_call_id",
                                  "missing_required_parameter")
            entry["tool_call_id"] = message["tool_call_id"]
            name = name or called.get(message["tool_call_id"])
        if name is not None:
            entry["name"] = name
        chat.append(entry)
    return chat


def _content(content: Any, param: str) -> str:
    """A string, or a list of text parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param} supports only text parts", param, "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{param} must be a string or a list of text parts", param, "invalid_type")
