"""Chat templates rendered exactly as transformers renders them: the same Jinja sandbox, globals
and filters (``compile_chat_template``), the same message normalisation and ``continue_final_message``
handling (``render_chat_template``), and ``chat_spans``, which finds the assistant turns of a rendered
conversation for any template by rendering its prefixes. jinja2 is imported only when a template is
compiled. ``zenlm.tokenizer.Tokenizer`` chooses the template and tokenizes what this module renders.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Optional, Sequence, Union


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (its ``raise_exception(...)`` message) or failed to render."""


def _generation_tag():
    """The ``{% generation %}...{% endgeneration %}`` extension: marks assistant text (transformers'
    ``return_assistant_tokens_mask``); renders its body unchanged, recording its span when tracked."""
    import jinja2
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            tracker = _GENERATION.get()
            if tracker is not None:
                blocks, spans = tracker
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    return GenerationTag


def _sandbox_globals() -> dict:
    """transformers' template globals: ``raise_exception``, ``strftime_now``, and the guarded
    ``dict`` and ``namespace`` (no underscore-prefixed attributes)."""
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(format):
        from datetime import datetime

        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    return {"raise_exception": raise_exception, "strftime_now": strftime_now, "dict": TemplateDict(),
            "namespace": TemplateNamespace}


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def compile_chat_template(template: str):
    """The Jinja template in the sandbox transformers renders chat templates in: an immutable
    sandboxed environment with trim_blocks/lstrip_blocks, loop controls, the ``{% generation %}``
    tag, ``raise_exception``, ``strftime_now``, a ``tojson`` that neither escapes HTML nor sorts
    keys (with indent, separators, ensure_ascii, sort_keys), and the guarded ``dict``/``namespace``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        # chat templates come with downloaded models: untrusted code, and older sandboxes have known escapes
        raise ImportError(f"chat templates need jinja2>=3.1.6 (found {jinja2.__version__}): pip install -U jinja2")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(_sandbox_globals())
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def _generation_tracker():
    from contextvars import ContextVar

    return ContextVar("zenlm_generation_tracker", default=None)


_GENERATION = _generation_tracker()
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain_template_data(value: Any) -> Any:
    """What a template may see: plain JSON-like data (as transformers rebuilds it), dataclasses and
    pydantic models as dicts, anything else an inert ``<TypeName>`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy/torch scalars
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _as_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_as_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _as_dicts(value.model_dump())
    return value


def normalize_messages(conversation: Any) -> list[dict]:
    """Messages as dicts (dataclasses and pydantic models, e.g. the OpenAI SDK's, converted), keys whose
    value is None dropped (``content=None`` beside tool calls), as transformers does before rendering."""
    messages = _as_dicts(getattr(conversation, "messages", conversation))
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}"[:300])
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _tool_schemas(tools) -> Optional[list]:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif callable(tool):
            try:  # a Python function: transformers turns its signature and docstring into a JSON schema
                from transformers.utils import get_json_schema
            except ImportError:
                raise ValueError("tools must be JSON schemas (dicts); converting a Python function needs "
                                 "transformers (transformers.utils.get_json_schema)") from None
            schemas.append(get_json_schema(tool))
        else:
            raise ValueError("Tools should either be a JSON schema, or a callable function with type hints "
                             "and a docstring suitable for auto-conversion to a schema.")
    return schemas


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _with_reasoning_aliases(chat: list[dict]) -> list[dict]:
    """Each message's reasoning under its older names too (``thinking``, ``reasoning_content``), as
    transformers passes it."""
    aliased = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _mark_final_message(chat: list[dict], template: str, continue_final_message: Union[bool, str]) -> str:
    """Append transformers' continue tag to the last message's text (in place), so the rendering can be
    cut where that message ends; returns the message's text before the tag."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    field_name = continue_final_message if isinstance(continue_final_message, str) else "content"
    final_message = chat[-1].get(field_name)
    if final_message is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field_name}" to continue!')
    fields = [field_name]
    if field_name in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
    if not any(f in template for f in fields):
        raise ValueError(f'continue_final_message is set to "{field_name}" but this is not an accepted field '
                         "in the chat_template")
    if isinstance(final_message, (list, tuple)):
        for block in reversed(final_message):
            if "text" in block:
                final_message = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message is set but we could not find any text to continue in the "
                             "final message!")
    else:
        for f in fields:
            chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final_message


def _cut_at_continue_tag(text: str, final_message: str) -> str:
    """The rendering up to where the continued final message ends (its end-of-turn tokens dropped)."""
    tag = _CONTINUE_TAG
    if final_message.strip() not in text or tag.strip() not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         "applying the chat template")
    at = text.rindex(tag.strip())
    return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()


def render_chat_template(template: str, messages: Sequence, tools: Optional[Sequence] = None,
                         documents: Optional[Sequence] = None, add_generation_prompt: bool = False,
                         continue_final_message: Union[bool, str] = False, track_generation: bool = False,
                         **variables) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation: the text and, with ``track_generation``, the character spans of the
    template's ``{% generation %}`` blocks. ``variables`` are further template variables (the special
    tokens, ``enable_thinking``, ``date_string``, ...). A template's ``raise_exception`` and any
    rendering failure are a ``ChatTemplateError`` (a ValueError) carrying its message."""
    import jinja2

    compiled = compile_chat_template(template)
    if documents is not None and any(not isinstance(d, dict) for d in documents):
        raise ValueError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools = plain_template_data(_tool_schemas(tools))
    documents = plain_template_data(documents)
    variables = plain_template_data(variables)
    chat = _with_reasoning_aliases(plain_template_data(normalize_messages(messages)))
    final_message = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        final_message = _mark_final_message(chat, template, continue_final_message)
    context = dict(variables, messages=chat, tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt)
    spans: list[tuple[int, int]] = []
    try:
        if track_generation:
            blocks: list[str] = []
            token = _GENERATION.set((blocks, spans))
            try:
                for block in compiled.generate(**context):
                    blocks.append(block)
            finally:
                _GENERATION.reset(token)
            text = "".join(blocks)
        else:
            text = compiled.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(str(e.message if e.message is not None else e)) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
    if continue_final_message:
        text = _cut_at_continue_tag(text, final_message)
    return text, spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _after_prompt(prompt: str, text: str) -> Optional[int]:
    """Where ``prompt`` ends inside ``text``, whitespace aside (templates without whitespace control
    render the generation prompt and the same header before a reply with different blank lines), with
    the whitespace that follows skipped; None when ``text`` does not start with the prompt."""
    j = 0
    for ch in prompt:
        if ch.isspace():
            continue
        while j < len(text) and text[j].isspace():
            j += 1
        if j >= len(text) or text[j] != ch:
            return None
        j += 1
    while j < len(text) and text[j].isspace():
        j += 1
    return j


def chat_spans(render, messages: Sequence[dict], roles: Sequence[str] = ("assistant",)
               ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every message whose role is in ``roles``
    (its content, tool calls and end-of-turn token, not the header before it), found by rendering
    prefixes of the conversation, so it works for any template, with or without ``{% generation %}``.

    ``render(messages, add_generation_prompt)`` renders a conversation. A turn spans from the end of
    ``render(messages[:i], True)`` (the prompt a model answers, whitespace aside) to the end of
    ``render(messages[:i+1], False)``, trailing whitespace excluded; a template without a generation
    prompt (Llama 2, Mistral) starts the turn where the two renderings part. Where a template renders
    a prefix differently from the start of the whole conversation (Mistral's tools move to the last
    user message), the turn's text is searched for in the whole rendering after the previous turn. A
    template that rewrites past turns depending on later ones (dropping earlier reasoning) gives a
    ChatTemplateError naming the turn."""
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") not in roles:
            continue
        before = ""
        for prompt in (True, False):  # a template may refuse a prefix (one that needs a user message first)
            try:
                before = render(messages[:i], prompt)
                break
            except ChatTemplateError:
                continue
        through = render(messages[:i + 1], False)
        start = _after_prompt(before, through)
        if start is None:  # no generation prompt, or not how the turn starts: where the renderings part
            start = _common_prefix(before, through)
        turn = through[start:].rstrip()
        if not turn:
            continue
        if not full.startswith(through) or start < cursor:
            start = full.find(turn, cursor)
            if start < 0:
                raise ChatTemplateError(f"message {i} ({message.get('role')}) is rendered differently inside the "
                                        "whole conversation than at its end: the template rewrites past turns, so "
                                        "its assistant tokens cannot be found by rendering")
        spans.append((start, start + len(turn)))
        cursor = start + len(turn)
    return full, spans
