"""Tools in /v1/chat/completions: ``tools`` rendered into the prompt by the model's chat template, the
reply parsed into OpenAI ``tool_calls`` by the parser of the template's format, and ``tool_choice``
"required" or one named function enforced by constrained decoding (zenlm.constraints).

Formats: ``hermes`` (Hermes, Qwen: ``<tool_call>{"name", "arguments"}</tool_call>``), ``llama3`` (Llama 3.1:
one JSON object ``{"name", "parameters"}``, optionally after ``<|python_tag|>``), ``mistral``
(``[TOOL_CALLS][{"name", "arguments"}, ...]``) and ``zenlm`` (zenlm's ``<|role|>`` template: the tools
listed in a system message, calls written as hermes' tags, results given back in ``<tool_response>``).
A reply that does not parse is plain content with finish reason "stop", never an error.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Optional

from ..errors import InvalidRequest

FORMATS = ("hermes", "llama3", "mistral", "zenlm")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


def template_format(template: Optional[str]) -> Optional[str]:
    """The tool-call format a chat template writes (None: the template has no place for tools).
    ``template`` None means zenlm's own ``<|role|>`` template."""
    if template is None:
        return "zenlm"
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    return "llama3"  # Llama 3.1/3.2 and other templates that ask for a bare JSON call


def _call(obj, name_keys=("name",), arg_keys=("arguments", "parameters")) -> Optional[ToolCall]:
    if not isinstance(obj, dict):
        return None
    name = next((obj[k] for k in name_keys if isinstance(obj.get(k), str)), None)
    args = next((obj[k] for k in arg_keys if k in obj), None)
    if name is None:
        return None
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            json.loads(args)
        except ValueError:
            return None
        return ToolCall(name, args)
    return ToolCall(name, json.dumps(args if args is not None else {}, ensure_ascii=False))


def parse_tool_calls(fmt: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a reply; no calls when it holds none or any of them is malformed (then the
    whole text is content)."""
    plain = (text, [])
    if fmt in ("hermes", "zenlm"):
        found = list(re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, flags=re.S))
        if not found:
            return plain
        calls = []
        for m in found:
            try:
                call = _call(json.loads(m.group(1)))
            except ValueError:
                return plain
            if call is None:
                return plain
            calls.append(call)
        rest = text
        for m in reversed(found):
            rest = rest[:m.start()] + rest[m.end():]
        return (rest.strip() or None), calls
    if fmt == "mistral":
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep:
            return plain
        try:
            value, _ = json.JSONDecoder().raw_decode(tail.strip())
        except ValueError:
            return plain
        items = value if isinstance(value, list) else [value]
        calls = [_call(v) for v in items]
        if not calls or any(c is None for c in calls):
            return plain
        return (head.strip() or None), calls
    # llama3: the whole reply is one call (or a list of them), maybe after <|python_tag|>
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    try:
        value = json.loads(body)
    except ValueError:
        return plain
    items = value if isinstance(value, list) else [value]
    calls = [_call(v, arg_keys=("parameters", "arguments")) for v in items]
    if not calls or any(c is None for c in calls):
        return plain
    return None, calls


def _call_schema(tool, fmt: str) -> dict:
    params = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
    args = "parameters" if fmt == "llama3" else "arguments"
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, args: params},
            "required": ["name", args], "additionalProperties": False}


def forced_grammar(fmt: str, tools, parallel: bool, tokenizer) -> str:
    """A Lark grammar (llguidance's, with inline ``%json``) whose every sentence is one call (or several,
    when ``parallel``) of the given tools in the format ``fmt``, arguments valid against each schema."""
    schemas = [_call_schema(t, fmt) for t in tools]
    # compact JSON (no runaway whitespace from a weak model): llguidance's per-schema options
    one = json.dumps({**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}),
                      "x-guidance": {"whitespace_flexible": False}})
    if fmt in ("hermes", "zenlm"):
        return f'start: call{"+" if parallel else ""}\ncall: "<tool_call>" %json {one} "</tool_call>"'
    if fmt == "mistral":
        items = {"type": "array", "items": json.loads(one), "minItems": 1,
                 "x-guidance": {"whitespace_flexible": False}}
        items["items"].pop("x-guidance")
        if not parallel:
            items["maxItems"] = 1
        special = tokenizer.token_to_id("[TOOL_CALLS]")
        lead = f"<[{special}]>" if special is not None else '"[TOOL_CALLS]"'
        return f"start: {lead} %json {json.dumps(items)}"
    return f"start: %json {one}"


ZENLM_TOOLS_PROMPT = ("You can call these tools. To call one, reply with <tool_call>{\"name\": NAME, "
                      "\"arguments\": {...}}</tool_call>.\nTools: ")


def zenlm_messages(messages: list[dict], tools) -> list[dict]:
    """A conversation with tools in zenlm's ``<|role|>`` template, which knows only system, user and
    assistant: the tools in a system message, calls as ``<tool_call>`` tags, results as user turns."""
    listing = json.dumps([t.function.model_dump(exclude_none=True) for t in tools], ensure_ascii=False,
                         separators=(",", ":"))
    out = [{"role": "system", "content": ZENLM_TOOLS_PROMPT + listing}]
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content)
        content = content or ""
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>{content}</tool_response>"})
        elif m.get("tool_calls"):
            calls = "".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                        "arguments": json.loads(c["function"]["arguments"] or "{}")},
                                                       ensure_ascii=False, separators=(",", ":")) + "</tool_call>"
                            for c in m["tool_calls"])
            out.append({"role": "assistant", "content": content + calls})
        else:
            out.append({"role": m["role"] if m["role"] != "developer" else "system", "content": content})
    return out


@dataclass
class ToolContext:
    """What the chat route knows about a request's tools: the format to parse, the prompt, and the
    grammar that forces a call (``tool_choice`` "required" or a named function)."""

    format: str
    prompt: list[int]
    grammar: Optional[str] = None


def tool_context(served, body) -> Optional[ToolContext]:
    """None when the request has no tools (or ``tool_choice`` "none" with none given back); a 400 naming
    why when the model's template has no place for tools."""
    if not body.tools:
        return None
    tokenizer = served.tokenizer
    template = tokenizer.get_chat_template(tools=[]) if tokenizer.has_chat_template else None
    if template is None and tokenizer.token_to_id("<|assistant|>") is None:
        raise InvalidRequest(f"{served.id!r} has no chat template and no zenlm role tokens, so it has no place for "
                             f"tools", param="tools")
    fmt = template_format(template)
    if fmt is None:
        raise InvalidRequest(f"the chat template of {served.id!r} does not render tools (it never reads 'tools'); "
                             f"this model cannot be given tools", param="tools")
    messages = [m.as_dict() for m in body.messages]
    if fmt == "zenlm":
        prompt = served.encode_chat(zenlm_messages(messages, body.tools))
    else:
        from ...tasks.chat import chat_prompt
        try:
            prompt = chat_prompt(tokenizer, messages, tools=[t.model_dump(exclude_none=True) for t in body.tools])
        except ValueError as e:
            raise InvalidRequest(f"the chat template of {served.id!r} refused these messages and tools: {e}",
                                 param="messages") from None
    choice = body.tool_choice
    grammar = None
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        tools = body.tools if choice == "required" else [t for t in body.tools
                                                         if t.function.name == choice.function.name]
        parallel = choice == "required" and body.parallel_tool_calls is not False
        grammar = forced_grammar(fmt, tools, parallel, tokenizer)
    return ToolContext(fmt if choice != "none" else "none", prompt, grammar)


def tool_calls_of(ctx: Optional[ToolContext], text: str) -> tuple[Optional[str], list[ToolCall]]:
    if ctx is None or ctx.format == "none":
        return text, []
    return parse_tool_calls(ctx.format, text)
