"""Tool calling on the chat endpoint (OpenAI's ``tools``, ``tool_choice``,
``parallel_tool_calls``): the tools go into the prompt, the model's calls come out of its text.

- Prompt: a chat template that reads ``tools`` (Qwen2.5's, Llama 3.1's, Hermes') gets them as
  HF transformers passes them; for one that does not (the built-in SmolLM2's), a system message
  lists them and asks for calls in the Hermes form, and earlier calls and tool results in the
  conversation are written in that form too.
- Output (``--tool-call-parser``, vLLM's names): ``hermes``, calls as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, any other text being the
  content; ``llama3_json``, an output that is a JSON object ``{"name": ..., "parameters": ...}``
  (several joined by ``;``, optionally after ``<|python_tag|>``).
- ``tool_choice``: ``auto`` lets the model choose and parses what it wrote; ``required`` and a
  named function constrain the output (structured outputs) to calls of the allowed functions with
  arguments valid for their JSON schemas, one call unless ``parallel_tool_calls``; ``none`` leaves
  the tools out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_OPEN = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


def check_parser(name: str) -> str:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {', '.join(PARSERS)}")
    return name


def _call_from(obj, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    return ToolCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)`` of a finished output: the calls it makes, and the text besides them
    (None when there is none). Text that does not parse as a call stays content."""
    if parser == "hermes":
        calls, content = [], text
        for match in _HERMES_CALL.finditer(text):
            try:
                call = _call_from(json.loads(match.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
                content = content.replace(match.group(0), "", 1)
        content = content.strip()
        return (content or None) if calls else text, calls
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    calls, decoder, at = [], json.JSONDecoder(), 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return text, []
        call = _call_from(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    return (None, calls) if calls else (text, [])


def held_back(text: str, parser: str) -> int:
    """While streaming: how many characters at the end of ``text`` may belong to a tool call
    and must wait for the finished output (all of them once a call has begun)."""
    if parser == "hermes":
        at = text.find(_HERMES_OPEN)
        if at >= 0:
            return len(text) - at
        for n in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1):  # a partial "<tool_call>"
            if _HERMES_OPEN.startswith(text[-n:]):
                return n
        return 0
    start = text.lstrip()
    if not start or start.startswith(("{", _PYTHON_TAG)) or _PYTHON_TAG.startswith(start):
        return len(text)
    return 0


def _function(tool) -> dict:
    return tool["function"] if "function" in tool else tool


def allowed_tools(tools: list[dict], tool_choice) -> list[dict]:
    """The tools a call may name: all, or the one ``tool_choice`` names (a ValueError if none
    of the tools has that name)."""
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        chosen = [t for t in tools if _function(t)["name"] == name]
        if not chosen:
            names = ", ".join(_function(t)["name"] for t in tools)
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the "
                             f"tools ({names})")
        return chosen
    return tools


def call_constraint(tools: list[dict], parser: str, parallel: bool) -> dict:
    """A structured-output constraint (``guided_decoding`` fields) that admits only calls of
    ``tools`` in ``parser``'s form, each call's arguments valid for its function's schema."""
    def schema(tool) -> dict:
        function = _function(tool)
        arguments = "arguments" if parser == "hermes" else "parameters"
        return {"type": "object", "additionalProperties": False, "required": ["name", arguments],
                "properties": {"name": {"const": function["name"]},
                               arguments: function.get("parameters") or {"type": "object"}}}

    # compact JSON, as for response_format: no free whitespace to stall in
    body = json.dumps({"anyOf": [schema(t) for t in tools],
                       "x-guidance": {"whitespace_flexible": False}})
    if parser == "hermes":
        call = 'call: "<tool_call>\\n" body "\\n</tool_call>"'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
    else:
        call = "call: body"
        start = 'start: call ("; " call)*' if parallel else "start: call"
    return {"grammar": f"{start}\n{call}\nbody: %json {body}\n"}


def _tool_text(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(_function(t)) for t in tools)
    return ("You can call functions to help answer. Their signatures, one JSON object per line:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, write a JSON object with its name and its arguments between tags, one "
            "block per call:\n<tool_call>\n{\"name\": \"...\", \"arguments\": {...}}\n</tool_call>")


def template_reads_tools(tokenizer) -> bool:
    template = getattr(getattr(tokenizer, "hf", tokenizer), "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def prompt_messages(messages: list[dict], tools: list[dict] | None,
                    reads_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """``(messages, tools)`` to hand the chat template: as they are when it reads tools;
    otherwise the tools described in a system message and earlier calls and results written
    out as text (the template then sees plain turns)."""
    if reads_tools or not tools and not any(m.get("tool_calls") or m["role"] == "tool"
                                            for m in messages):
        return messages, tools
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                             "arguments": c["function"]["arguments"]})
                               + "\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(p for p in (m["content"], blocks) if p)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + _tool_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": _tool_text(tools)})
    return out, None
