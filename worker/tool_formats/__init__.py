"""Tool calling as a model family writes it: how the chat reaches the template, the grammar an
answer must follow, and how an answer is read, as it streams, into reply text and call pieces.

A chat template that takes `tools` and writes calls in a format known here gets the tools, the
earlier calls and the tool results natively:

- hermes (Qwen 2.5 and 3, Hermes, SmolLM3, ...): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after optional text;
- llama3 (Llama 3.1 to 3.3): the whole answer is one `{"name": ..., "parameters": {...}}`.

Any other template gets the generic format (see `GenericFormat`): the tools described in the
system prompt and the answer a JSON object, either a reply or calls.

`base` says what a format is, `generic` and `native` hold the formats, `call_json` what they share.
"""

from __future__ import annotations

import logging
import re

import jinja2
import jinja2.meta

from worker.tool_formats.base import AnswerReader, ToolFormat
from worker.tool_formats.generic import GENERIC
from worker.tool_formats.native import HERMES, LLAMA3

__all__ = ["AnswerReader", "GENERIC", "HERMES", "LLAMA3", "ToolFormat", "format_for"]

log = logging.getLogger(__name__)


def format_for(template: str | None) -> ToolFormat:
    """The format for a chat template: a native one when the template takes `tools` and writes calls
    in a format known here, else the generic one."""
    if not template or not _takes_tools(template):
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    log.warning("the chat template takes tools, but writes calls in a format not known here: tools are "
                "offered in the generic format instead")
    return GENERIC


def _takes_tools(template: str) -> bool:
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own, e.g. {% generation %}
        return re.search(r"\btools\b", template) is not None
