"""Tools in /v1/chat/completions: ``tools`` rendered into the prompt by the model's chat template, the
reply parsed into OpenAI ``tool_calls`` by the parser of the template's format, and ``tool_choice``
"required" or one named function enforced by constrained decoding (zenlm.constraints).

Formats: ``hermes`` (Hermes, Qwen: ``<tool_call>{"name", "arguments"}</tool_call>``), ``llama3`` (Llama 3.1:
one JSON object ``{"name", "parameters"}``, optionally after ``<|python_tag|>``), ``mistral``
(``[TOOL_CALLS][{"name", "arguments"}, ...]``) and ``zenlm`` (zenlm's ``<|role|>`` template: the tools
listed in a system message, calls written as hermes' tags, results given back in ``<tool_response>``).
A reply that does not parse is plain content with finish reason "stop", never an error. One parser per
format reads a reply as it is written (``ToolCallParser``: a stream sends a call's start and then its
arguments fragment by fragment, as OpenAI's stream does) and reads whole replies too (``parse_tool_calls``).
"""
from __future__ import annotations

import json
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


ARG_KEYS = {"llama3": ("parameters", "arguments")}  # the key of a call's arguments, in order of preference
MARKERS = {"hermes": "<tool_call>", "zenlm": "<tool_call>", "mistral": "[TOOL_CALLS]"}
HERMES_CLOSE, PYTHON_TAG = "</tool_call>", "<|python_tag|>"


@dataclass
class ToolDelta:
    """One piece of a streamed reply: ``content`` text, or for tool call ``index`` its start (``id`` and
    ``name``, arguments "") or a fragment of its ``arguments``."""

    content: Optional[str] = None
    index: Optional[int] = None
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None


class _CallScan:
    """One call object ``{"name": ..., "arguments": ...}`` read a character at a time: where its top-level
    values lie (so the arguments can be passed on as the model writes them) and where the object ends. Only
    brackets, strings and escapes are followed; whether the object is valid JSON is json.loads's to say once
    it is complete."""

    def __init__(self, start: int):
        self.start, self.end = start, None  # text[start:end] is the object once complete
        self.depth, self.in_str, self.esc, self.str_role = 0, False, False, None
        self.expect = "open"  # at depth 1: key, colon, value, scalar, comma
        self.key_at, self.key = 0, None
        self.spans: dict[str, list] = {}  # top-level key -> [value start, value end or None]
        self.bad = False

    def feed(self, text: str, i: int) -> int:
        """Scan text[i:]; the index reached (the end of the object when it completes there)."""
        while i < len(text) and self.end is None and not self.bad:
            self._char(text, i, text[i])
            i += 1
        return i

    def _value_end(self, at: int) -> None:
        self.spans[self.key][1] = at
        self.expect = "comma"

    def _char(self, text: str, i: int, c: str) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                if self.str_role == "key":
                    try:
                        self.key = json.loads(text[self.key_at:i + 1])
                    except ValueError:
                        self.bad = True
                    self.expect = "colon"
                elif self.str_role == "value":
                    self._value_end(i + 1)
            return
        if self.depth > 1:
            if c == '"':
                self.in_str, self.str_role = True, None
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._value_end(i + 1)
            return
        if self.expect == "scalar":  # a number, true, false or null ends at whitespace, "," or "}"
            if not (c.isspace() or c in ",}"):
                return
            self._value_end(i)
        if c.isspace():
            return
        if self.expect == "open":
            self.depth, self.expect, self.bad = 1, "key", c != "{"
        elif self.expect == "key" and c == '"':
            self.in_str, self.str_role, self.key_at = True, "key", i
        elif self.expect == "colon" and c == ":":
            self.expect = "value"
        elif self.expect == "value":
            if self.key in self.spans:  # a key given twice: leave it to the final check
                self.bad = True
            self.spans[self.key] = [i, None]
            if c == '"':
                self.in_str, self.str_role = True, "value"
            elif c in "{[":
                self.depth, self.expect = 2, "nested"
            else:
                self.expect = "scalar"
        elif self.expect == "comma" and c == ",":
            self.expect = "key"
        elif self.expect in ("key", "comma") and c == "}":
            self.depth, self.end = 0, i + 1
        else:
            self.bad = True


class ToolCallParser:
    """A reply parsed for tool calls while it is written (``feed`` each text delta, ``finish`` at the end),
    in a template's format: content until a call starts, then each call's start (id and name) once its name
    is known and its arguments have begun, and the arguments as the model writes them. The same parser
    reads a whole reply (``parse_tool_calls``), so a stream and a whole answer agree.

    Content next to calls: text before the first call goes out as it comes, whitespace held until something
    follows it (whitespace just before a call is dropped); text after a call is held and sent at the end
    (trailing whitespace dropped). A reply in which any call turns out malformed (or cut off) is content, all of it, exactly once:
    whatever was not yet sent as content goes out at the end (the call deltas already sent stay sent).
    """

    def __init__(self, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"tool-call format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt = fmt
        self.marker = MARKERS.get(fmt)
        self.arg_keys = ARG_KEYS.get(fmt, ("arguments", "parameters"))
        self.text = ""
        self.i = 0  # the next character to read
        self.sent = 0  # text[:sent] went out as content
        self.state = "start" if fmt == "llama3" else "content"
        self.in_array = False
        self.scan: Optional[_CallScan] = None
        self.streamed = 0  # text[:streamed] of the current call's arguments went out
        self.current: Optional[ToolCall] = None  # the call being read, once its start went out
        self.calls: list[ToolCall] = []
        self.after: list[str] = []  # content after the first call, held until the end
        self.content: Optional[str] = None  # set by finish()

    # ------------------------------------------------------------------ the two entry points
    def feed(self, delta: str) -> list[ToolDelta]:
        self.text += delta
        out: list[ToolDelta] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[ToolDelta]:
        """The last deltas; then ``content`` and ``calls`` hold the reply as a whole answer gives it."""
        out: list[ToolDelta] = []
        self._run(out, final=True)
        # complete: after a closed call (or one whose closing tag never came), or a closed list
        ok = bool(self.calls) and (self.state in ("after", "end") or (self.state == "close" and self.marker == "<tool_call>"))
        if not ok:  # no call, or a malformed or unfinished one: every character is content
            if self.sent < len(self.text):
                out.append(ToolDelta(content=self.text[self.sent:]))
            self.content, self.calls = self.text, []
            return out
        if self.state == "after" and self.i < len(self.text):
            self.after.append(self.text[self.i:])
        tail = "".join(self.after).rstrip()
        tail = tail if self.sent else tail.lstrip()  # the text between stays as written
        if tail:
            out.append(ToolDelta(content=tail))
        self.content = (self.text[:self.sent] + tail) or None
        return out

    # ------------------------------------------------------------------ the state machine
    def _skip_space(self) -> bool:
        """Past whitespace; whether a character follows."""
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1
        return self.i < len(self.text)

    def _content(self, out: list[ToolDelta], final: bool) -> None:
        """Plain text until the format's marker: sent, less trailing whitespace and a possible marker start."""
        at = self.text.find(self.marker, self.i)
        if at < 0:
            hold = 0 if final else next((k for k in range(min(len(self.marker) - 1, len(self.text)), 0, -1)
                                         if self.marker.startswith(self.text[-k:])), 0)
            end = self.i = len(self.text) - hold
        else:
            end, self.i = at, at + len(self.marker)
            self.state = "open"
        if not final or at >= 0:  # whitespace waits for what follows it (dropped before a call)
            while end > self.sent and self.text[end - 1].isspace():
                end -= 1
        if end > self.sent:
            out.append(ToolDelta(content=self.text[self.sent:end]))
            self.sent = end

    def _run(self, out: list[ToolDelta], final: bool) -> None:
        while True:
            state = self.state
            if state == "content":
                self._content(out, final)
                if self.state == "content":
                    return
            elif state == "start":  # llama3: a JSON call (or list), maybe after <|python_tag|>, else content
                if not self._skip_space():
                    return
                rest = self.text[self.i:]
                if PYTHON_TAG.startswith(rest) and not final:
                    return
                if rest.startswith(PYTHON_TAG):
                    self.i += len(PYTHON_TAG)
                    self.state = "open"
                elif rest[0] in "{[":
                    self.state = "open"
                else:
                    self.state = "plain"
            elif state == "plain":  # llama3 text that is no call: all content, as it comes
                if self.sent < len(self.text):
                    out.append(ToolDelta(content=self.text[self.sent:]))
                    self.sent = len(self.text)
                return
            elif state == "open":  # after a marker: one call object, or (llama3, mistral) a list of them
                if not self._skip_space():
                    return
                c = self.text[self.i]
                if c == "[" and self.fmt in ("llama3", "mistral") and not self.in_array and not self.calls:
                    self.in_array = True
                    self.i += 1
                    continue
                if c != "{":
                    self.state = "broken"
                    continue
                self.scan, self.streamed, self.current = _CallScan(self.i), 0, None
                self.state = "call"
            elif state == "call":
                self.i = self.scan.feed(self.text, self.i)
                if self.scan.bad:
                    self.state = "broken"
                    continue
                self._pass_on(out)
                if self.scan.end is None:
                    return
                if not self._complete(out):
                    self.state = "broken"
                    continue
                self.state = "close"
            elif state == "close":  # after a call: its closing tag, the list's next item or end, or the reply's end
                if self.marker != "<tool_call>" and not self.in_array:
                    self.state = "end"
                    continue
                if not self._skip_space():
                    return
                rest = self.text[self.i:]
                if self.fmt in ("hermes", "zenlm"):
                    if HERMES_CLOSE.startswith(rest) and not final:
                        return
                    if not rest.startswith(HERMES_CLOSE):
                        self.state = "broken"
                        continue
                    self.i += len(HERMES_CLOSE)
                    self.state = "after"
                elif self.in_array and rest[0] in ",]":
                    self.i += 1
                    self.state = "open" if rest[0] == "," else "end"
                else:
                    self.state = "broken"
            elif state == "after":  # hermes/zenlm: text between or after calls, held; another call may follow
                at = self.text.find(self.marker, self.i)
                if at < 0:
                    return
                self.after.append(self.text[self.i:at])
                self.i = at + len(self.marker)
                self.state = "open"
            elif state == "end":  # the list is closed: only whitespace (llama3) or anything (mistral) may follow
                if self.fmt == "llama3" and self._skip_space():
                    self.state = "broken"
                    continue
                if self.fmt == "mistral":
                    self.after.append(self.text[self.i:])
                    self.i = len(self.text)
                return
            else:  # broken: nothing more is parsed; finish() sends what is left as content
                return

    def _args_key(self) -> Optional[str]:
        return next((k for k in self.arg_keys if k in self.scan.spans), None)

    def _pass_on(self, out: list[ToolDelta]) -> None:
        """The call's start once its name is known and its arguments (an object or list) have begun, then
        the arguments written since."""
        scan = self.scan
        name_span, key = scan.spans.get("name"), self._args_key()
        if key is None or name_span is None or name_span[1] is None:
            return
        start, end = scan.spans[key]
        if self.text[start] not in "{[":  # a string or scalar: passed on whole once the call is complete
            return
        if self.current is None:
            try:
                name = json.loads(self.text[name_span[0]:name_span[1]])
            except ValueError:
                return
            if not isinstance(name, str):
                return
            self.current = ToolCall(name, "")
            out.append(ToolDelta(index=len(self.calls), id=self.current.id, name=name, arguments=""))
            self.streamed = start
        upto = end if end is not None else len(self.text)
        if upto > self.streamed:
            out.append(ToolDelta(index=len(self.calls), arguments=self.text[self.streamed:upto]))
            self.streamed = upto

    def _complete(self, out: list[ToolDelta]) -> bool:
        """A call object has closed: whether it is a valid call (then it is one of ``calls``)."""
        scan = self.scan
        try:
            obj = json.loads(self.text[scan.start:scan.end])
        except ValueError:
            return False
        key = self._args_key()
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return False
        value = obj.get(key) if key is not None else None
        if isinstance(value, (dict, list)):
            arguments = self.text[scan.spans[key][0]:scan.spans[key][1]]  # the model's own text
        elif isinstance(value, str):  # some models write the arguments as JSON text already
            try:
                json.loads(value)
            except ValueError:
                return False
            arguments = value
        else:
            arguments = json.dumps(value if value is not None else {}, ensure_ascii=False)
        if self.current is None:
            self.current = ToolCall(obj["name"], "")
            out.append(ToolDelta(index=len(self.calls), id=self.current.id, name=obj["name"], arguments=""))
            out.append(ToolDelta(index=len(self.calls), arguments=arguments))
        elif self.current.name != obj["name"]:
            return False
        self.current.arguments = arguments
        self.calls.append(self.current)
        self.current = None
        return True


def parse_tool_calls(fmt: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a whole reply; no calls when it holds none or any of them is malformed (then
    the whole text is content). The streaming parser, fed the reply at once."""
    parser = ToolCallParser(fmt)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls


def _call_schema(tool, fmt: str) -> dict:
    params = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
    args = "parameters" if fmt == "llama3" else "arguments"
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, args: params},
            "required": ["name", args], "additionalProperties": False}


def forced_grammar(fmt: str, tools, parallel: bool, tokenizer) -> str:
    """A Lark grammar (llguidance's, with inline ``%json``) whose every sentence is one call (or several,
    when ``parallel``) of the given tools in the format ``fmt``, arguments valid against each schema."""
    schemas = [_call_schema(t, fmt) for t in tools]
    call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # compact JSON (no runaway whitespace from a weak model): llguidance's per-schema options
    one = json.dumps({**call, "x-guidance": {"whitespace_flexible": False}})
    if fmt in ("hermes", "zenlm"):
        return f'start: call{"+" if parallel else ""}\ncall: "<tool_call>" %json {one} "</tool_call>"'
    if fmt == "mistral":
        items = {"type": "array", "items": call, "minItems": 1, "x-guidance": {"whitespace_flexible": False}}
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


def template_messages(messages: list[dict]) -> list[dict]:
    """The conversation as tool-using chat templates read it: a past call's ``arguments`` as an object (they
    write it with ``| tojson``; OpenAI's JSON text would reach the model quoted twice), as vLLM passes them,
    and a tool result with the ``name`` of the function whose call it answers (OpenAI's messages name only
    the call's id; Hermes' template refuses a result without the name)."""
    out, names = [], {}
    for m in messages:
        if m.get("role") == "tool" and not m.get("name") and m.get("tool_call_id") in names:
            m = {**m, "name": names[m["tool_call_id"]]}
        if m.get("tool_calls"):
            names.update({c.get("id"): (c.get("function") or {}).get("name") for c in m["tool_calls"]})
            calls = []
            for c in m["tool_calls"]:
                function = dict(c.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"] or "{}")
                    except ValueError:
                        pass  # not JSON: the template gets the text as it came
                calls.append({**c, "function": function})
            m = {**m, "tool_calls": calls}
        out.append(m)
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
            prompt = chat_prompt(tokenizer, template_messages(messages),
                                 tools=[t.model_dump(exclude_none=True) for t in body.tools])
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
