"""From a request to prompt token ids, with the tokenizer's own chat template."""

from __future__ import annotations

import json
import re

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from broker.protocol import GenerationRequest, ProtocolError, TokenLogprob
from worker.tool_formats import ToolFormat, format_for

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_decoder(tokenizer: PreTrainedTokenizerBase) -> dict[str, int] | None:
    """For byte-level BPE tokenizers (GPT-2 style), the table from token symbols back to bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("decoder", {}).get("type") != "ByteLevel":
        return None
    return {symbol: byte for byte, symbol in bytes_to_unicode().items()}


def _tool_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template used when tools are given (a tokenizer may keep one apart, as "tool_use")."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("tool_use", template.get("default"))
    return template


class PromptEncoder:
    """Encodes prompts and knows which tokens end the model's turn."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(self._end_of_turn_ids(generation_eos))
        self._byte_decoder = _byte_decoder(tokenizer)
        self.tool_format: ToolFormat = format_for(_tool_template(tokenizer))

    def encode(self, request: GenerationRequest, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens`: for a prompt, the tokenizer's own (BOS and the like); a chat template writes its own."""
        if request.prompt is not None:
            return self.tokenizer(request.prompt, add_special_tokens=add_special_tokens).input_ids
        if not self.tokenizer.chat_template:
            raise ProtocolError("this model has no chat template; send a plain 'prompt' instead", "messages")
        messages, template_arguments = self.tool_format.template_input(request.messages, request.tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **template_arguments)
        except TemplateError as exc:  # the template's own rule, e.g. "roles must alternate": the caller's to fix
            raise ProtocolError(f"the model's chat template rejects these messages: {exc}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def token_logprob(self, token_id: int, logprob: float,
                      top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        return TokenLogprob(self.tokenizer.decode([token_id]), logprob, self._token_bytes(token_id), top)

    def _token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes, even when it holds only part of a character."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)  # byte-level BPE: one symbol per byte
        if _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])  # SentencePiece's <0xHH>
        return self.tokenizer.decode([token_id]).encode()

    def _end_of_turn_ids(self, generation_eos: int | list[int] | None) -> set[int]:
        """The generation config's and tokenizer's EOS, plus the special token the chat template
        writes after an assistant turn (for ChatML models `<|im_end|>`)."""
        ids = {generation_eos} if isinstance(generation_eos, int) else set(generation_eos or ())
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if self.tokenizer.chat_template:
            marker = "tokenbus-end-of-turn-probe"  # no whitespace: templates that `trim` content keep it
            conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
            try:
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
            except Exception:  # templates may refuse such a short conversation; the EOS ids stand
                return ids
            if marker not in text:  # a template that rewrites content: nothing to learn from it
                return ids
            after = text.split(marker, 1)[1]
            following = self.tokenizer(after, add_special_tokens=False).input_ids[:1]
            if following and following[0] in self.tokenizer.all_special_ids:
                ids.add(following[0])
        return ids
