"""response_format through the server with the official client: json_object, json_schema (strict), and
``client.chat.completions.parse`` with a pydantic model, on the tiny random models (the constraint, not
the model, makes the output valid), each row its own grammar inside the continuous batch."""
from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["paris", "rome", "oslo"]},
    "rank": {"type": "integer", "minimum": 1, "maximum": 50},
    "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
    "required": ["city", "rank", "tags"], "additionalProperties": False}


class Weather(BaseModel):
    city: Literal["paris", "rome", "oslo"]
    degrees: int = Field(ge=-40, le=50)
    sunny: bool


def _fmt(schema=SCHEMA, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_chat_json_schema_each_choice_validates(running):
    client = running.client(running.key())
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], n=4,
                                       max_tokens=60, temperature=1.0, seed=5, response_format=_fmt(),
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        # log-probabilities (of the model's own distribution) keep working under the constraint
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert r.usage.completion_tokens > 0


def test_parse_with_a_pydantic_model(running):
    client = running.client(running.key())
    for seed in (0, 1):
        r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                          response_format=Weather, max_tokens=60, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Weather) and -40 <= parsed.degrees <= 50


def test_json_object_streamed_and_completions_route(running):
    client = running.client(running.key())
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=90, temperature=0.7, seed=2, stream=True,
                                            response_format={"type": "json_object"})
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length"
    r = client.completions.create(model="tiny", prompt=["the quick", "hello"], max_tokens=60, temperature=0,
                                  extra_body={"response_format": _fmt()})
    for c in r.choices:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_constrained_and_free_rows_share_the_batch(running):
    client = running.client(running.key())
    import concurrent.futures as cf
    pattern = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-c]{3}[0-9]$"}},
               "required": ["id"], "additionalProperties": False}

    def constrained(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"x{i}"}],
                                              max_tokens=40, seed=i, response_format=_fmt(pattern, f"s{i}"))

    def free(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"y{i}"}],
                                              max_tokens=20, seed=i)

    with cf.ThreadPoolExecutor(6) as pool:
        done = [pool.submit(constrained, i) for i in range(4)] + [pool.submit(free, i) for i in range(2)]
        results = [f.result() for f in done]
    for r in results[:4]:
        value = json.loads(r.choices[0].message.content)
        assert re.fullmatch("[a-c]{3}[0-9]", value["id"])
    assert all(r.choices[0].message.content is not None for r in results[4:])


def test_length_cut_and_bad_schema(running):
    client = running.client(running.key())
    long = {"type": "object", "properties": {"text": {"type": "string", "minLength": 80}}, "required": ["text"]}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format=_fmt(long))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format=_fmt({"type": "objectx"}, "broken_one"))
    assert "broken_one" in err.value.message and err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema"})
    # the schema is checked before anything is reserved: a key whose budget refuses every request still gets the
    # 400 naming the schema, and a good schema gets the budget's refusal
    broke = running.client(running.key("broke", "poor", prices={"*": (10**9, 10**9)}, monthly_budget_micros=1))
    with pytest.raises(openai.BadRequestError) as err:
        broke.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      response_format=_fmt({"type": "objectx"}, "broken_two"))
    assert "broken_two" in err.value.message
    with pytest.raises(openai.APIStatusError) as err:
        broke.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      response_format=_fmt())
    assert err.value.status_code in (402, 429)


# --------------------------------------------------------------------------- tools
from zenlm.serve.routes.tools import forced_grammar, parse_tool_calls, template_format  # noqa: E402

from .conftest import save_tiny, start_server  # noqa: E402

ADD = {"type": "function", "function": {"name": "add", "description": "Add two small numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}
CITY = {"type": "function", "function": {"name": "city", "description": "A city.", "parameters": {
    "type": "object", "properties": {"name": {"enum": ["paris", "rome"]}}, "required": ["name"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("fmt,text,calls,content", [
    ("hermes", 'ok <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', [("add", {"a": 1, "b": 2})],
     "ok"),
    ("hermes", '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n<tool_call>{"name":"city",'
               '"arguments":{"name":"rome"}}</tool_call>', [("add", {"a": 1, "b": 2}), ("city", {"name": "rome"})],
     None),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', [], None),
    ("zenlm", "just words", [], None),
    ("llama3", '{"name": "add", "parameters": {"a": 3, "b": 4}}', [("add", {"a": 3, "b": 4})], None),
    ("llama3", '<|python_tag|>{"name": "city", "parameters": {"name": "paris"}}', [("city", {"name": "paris"})], None),
    ("llama3", '{"name": "add", "parameters": {"a": 3', [], None),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "city", "arguments": '
                '{"name": "rome"}}]', [("add", {"a": 1, "b": 1}), ("city", {"name": "rome"})], None),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": ', [], None),
])
def test_parsers_on_fixed_strings(fmt, text, calls, content):
    got_content, got = parse_tool_calls(fmt, text)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    if calls:
        assert got_content == content and all(c.id.startswith("call_") for c in got)
    else:  # malformed or no call: the whole reply is content
        assert got_content == text


STREAM_CASES = [
    ("hermes", 'ok <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "city", '
               '"arguments": {"name": "ro\\"me"}}</tool_call> done'),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1, "b": [2, {"c": "}"}]}, "name": "add"}\n</tool_call>'),  # args first
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}'),  # arguments as JSON text; no closing tag
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "add", "argu'),
    ("hermes", "a <tool> b <tool_cal c"),
    ("zenlm", '  text <tool_call>{"name": "add", "arguments": {"a": 1}} trailing'),
    ("llama3", ' <|python_tag|>[{"name": "add", "parameters": {"a": 3}}, {"name": "city", "parameters": {"name": "x"}}]'),
    ("llama3", '{"answer": 42}'),
    ("llama3", '{"name": "add", "parameters": {"a": 3}} and more'),
    ("llama3", "plain words { not json"),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "city", "arguments": '
                '{"name": "rome"}}]'),
    ("mistral", '[TOOL_CALLS]{"name": "add", "arguments": {"a": 1, "b": 1}}'),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}} {"name"'),
]


def _assemble(fmt: str, pieces: list[str]):
    """Feed ``pieces`` to a ToolCallParser and put its deltas together as a client does: content joined, each
    call's id and name from its first delta, arguments joined. Also: the deltas, in order."""
    from zenlm.serve.routes.tools import ToolCallParser

    parser = ToolCallParser(fmt)
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    content, calls = "", {}
    for d in deltas:
        if d.index is None:
            content += d.content
        elif d.id is not None:
            assert d.index == len(calls) and d.arguments == "" and d.name
            calls[d.index] = [d.id, d.name, ""]
        else:
            calls[d.index][2] += d.arguments
    return parser, content, list(calls.values()), deltas


@pytest.mark.parametrize("fmt,text", STREAM_CASES)
def test_streaming_parser_agrees_with_the_whole_reply(fmt, text):
    """Fed a character at a time or in random pieces, the parser sends the calls the whole reply holds, with
    their arguments in fragments as written; content (or, when a call is malformed or cut, the whole reply)
    arrives exactly once."""
    import random

    whole_content, whole_calls = parse_tool_calls(fmt, text)
    rng = random.Random(len(text))
    cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
    for pieces in (list(text), [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]):
        parser, content, calls, deltas = _assemble(fmt, pieces)
        assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole_calls]
        assert parser.content == whole_content
        if whole_calls:
            assert [(name, args) for _, name, args in calls] == [(c.name, c.arguments) for c in whole_calls]
            assert [i for i, _, _ in calls] == [c.id for c in parser.calls]
            assert content == (whole_content or "")
            for c in whole_calls:
                json.loads(c.arguments)
        else:  # not a call after all: every character reaches the client as content, once
            assert content == text
    first = text.find('"name"')
    if whole_calls and -1 < first < text.find(': {', first):  # name first, then object arguments: streamed
        fragments = [d for d in _assemble(fmt, list(text))[3] if d.index == 0 and d.id is None]
        assert len(fragments) > 3  # written as they came, not whole at the end


def test_template_formats_and_forced_grammars_compile():
    assert template_format(None) == "zenlm"
    assert template_format("{{ messages }}") is None
    assert template_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert template_format("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert template_format("{% if tools %}{{ tools | tojson }}{% endif %}") == "llama3"
    from zenlm import Tokenizer
    from zenlm.constraints import compile_constraint
    tok = Tokenizer.train(["<tool_call> [TOOL_CALLS] {\"name\": 1}"] * 5, vocab_size=300)
    tools = [P.ToolDef(**ADD), P.ToolDef(**CITY)]
    for fmt in ("hermes", "zenlm", "llama3", "mistral"):
        for parallel in (True, False):
            assert compile_constraint(tok, 300, grammar=forced_grammar(fmt, tools, parallel, tok)) is not None


from zenlm.serve import protocol as P  # noqa: E402


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """zenlm's tiny model with room for the tools in its prompt (zenlm's <|role|> template)."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "tiny-wide", window=1024)
    r = start_server(tmp_path_factory.mktemp("server"), [folder])
    yield r
    r.stop()


def _validate_call(call, tool):
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_and_named_tool_choice_return_valid_calls(wide):
    client = wide.client(wide.key())
    messages = [{"role": "user", "content": "add 2 and 3"}]
    r = client.chat.completions.create(model="tiny-wide", messages=messages, tools=[ADD, CITY], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _validate_call(call, ADD if call.function.name == "add" else CITY)
    r = client.chat.completions.create(model="tiny-wide", messages=messages, tools=[ADD, CITY], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "city"}}, seed=2)
    assert r.choices[0].finish_reason == "tool_calls"
    _validate_call(r.choices[0].message.tool_calls[0], CITY)


def test_the_full_loop_call_result_answer_and_the_stream_helpers(wide):
    client = wide.client(wide.key())
    messages = [{"role": "user", "content": "add 2 and 3"}]
    first = client.chat.completions.create(model="tiny-wide", messages=messages, tools=[ADD],
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])}]
    final = client.chat.completions.create(model="tiny-wide", messages=messages, tools=[ADD], tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens
    # streamed: the client's helpers assemble the tool-call deltas into the same call
    with client.chat.completions.stream(model="tiny-wide", messages=messages[:1], tools=[ADD], max_tokens=60,
                                        tool_choice={"type": "function", "function": {"name": "add"}},
                                        temperature=0) as stream:
        for _ in stream:
            pass
        done = stream.get_final_completion()
    streamed = done.choices[0].message.tool_calls[0]
    assert done.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == ("add", call.function.arguments)


def test_tools_bad_input(wide, running):
    client = wide.client(wide.key())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-wide", messages=[{"role": "user", "content": "x"}], tools=[ADD],
                                       tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=4)
    assert "nope" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # window 128: the tools do not fit; a 400, never a 500
        running.client(running.key()).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], tools=[ADD, CITY], max_tokens=4)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """Tiny random Llama folders with tool-using chat templates (Llama 3.1 JSON, Hermes, Mistral) and one without
    tools (Llama 3 instruct), their window widened for the tool listings."""
    pytest.importorskip("transformers")
    from .test_serve_templates import TEMPLATES, write_instruct_folder

    root = tmp_path_factory.mktemp("tool-templates")
    folders = []
    for name, template in (("llama31-json", "vllm-tool-llama3.1-json.jinja"), ("hermes", "vllm-tool-hermes.jinja"),
                           ("mistral", "vllm-tool-mistral.jinja"), ("llama3-plain", "llama-3-instruct.jinja")):
        folder = write_instruct_folder(root / name, (TEMPLATES / template).read_text())
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 4096
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    r = start_server(tmp_path_factory.mktemp("server"), folders)
    r.folders = folders
    yield r
    r.stop()


@pytest.mark.parametrize("model", ["llama31-json", "hermes", "mistral"])
def test_forced_calls_through_real_tool_templates(templated, model):
    client = templated.client(templated.key())
    request = dict(model=model, messages=[{"role": "user", "content": "add 2 and 3"}], tools=[ADD, CITY],
                   max_tokens=80, temperature=0, tool_choice={"type": "function", "function": {"name": "add"}})
    r = client.chat.completions.create(**request)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    _validate_call(r.choices[0].message.tool_calls[0], ADD)
    # streamed in this template's format: the same call, its arguments in fragments
    content, calls, finish = _accumulate(client.chat.completions.create(stream=True, **request))
    assert finish == "tool_calls" and content == (r.choices[0].message.content or "")
    assert [(name, args) for _, name, args, _ in calls] == [("add", r.choices[0].message.tool_calls[0].function.arguments)]
    assert calls[0][3] > 1
    # the result goes back through the template (the call's arguments given to it as an object), then an answer
    call = r.choices[0].message.tool_calls[0]
    messages = request["messages"] + [r.choices[0].message.model_dump(exclude_none=True),
                                      {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    final = client.chat.completions.create(**{**request, "messages": messages, "tool_choice": "none", "max_tokens": 4})
    assert final.choices[0].finish_reason in ("stop", "length") and final.usage.prompt_tokens > r.usage.prompt_tokens
    # the past call reaches the template with its arguments as an object, as transformers renders it
    from transformers import AutoTokenizer

    from zenlm.serve.routes.tools import template_messages
    folder = next(f for f in templated.folders if f.name == model)
    given = template_messages([m if m["role"] != "assistant" else {**m, "content": m.get("content") or ""}
                               for m in messages])
    assert given[1]["tool_calls"][0]["function"]["arguments"] == json.loads(call.function.arguments)
    text = AutoTokenizer.from_pretrained(folder).apply_chat_template(given, tools=[ADD, CITY], tokenize=False,
                                                                      add_generation_prompt=True)
    assert json.dumps(json.loads(call.function.arguments)) in text or model == "mistral"
    # "auto": the random model writes whatever it likes; what does not parse is content, never an error
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], tools=[ADD],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content is not None


def test_tools_for_a_template_without_them_is_a_400_naming_why(templated):
    with pytest.raises(openai.BadRequestError) as err:
        templated.client(templated.key()).chat.completions.create(
            model="llama3-plain", messages=[{"role": "user", "content": "x"}], tools=[ADD], max_tokens=4)
    assert "does not render tools" in err.value.message and err.value.body["param"] == "tools"


def _accumulate(chunks):
    """A stream's chunks put together by hand, as an application without the helpers does: content joined,
    per tool-call index the first delta's id and name and the arguments fragments joined; the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in calls and d.type == "function" and d.function.name
                    assert d.function.arguments == ""  # OpenAI's first delta of a call: no arguments yet
                    calls[d.index] = [d.id, d.function.name, "", 0]
                else:
                    assert d.function.name is None and d.index in calls
                    calls[d.index][2] += d.function.arguments
                    calls[d.index][3] += 1
    return content, [calls[i] for i in sorted(calls)], finish


def test_tool_calls_stream_token_by_token_two_in_parallel(wide):
    """tool_choice "required" with two parallel calls, streamed: each call's first delta (index, id, type,
    name, arguments ""), then its arguments in fragments as generated; hand accumulation and both of the
    client's stream helpers assemble the same calls as the whole (non-streamed) answer."""
    client = wide.client(wide.key())
    request = dict(model="tiny-wide", messages=[{"role": "user", "content": "add 2 and 3, and name a city"}],
                   tools=[ADD, CITY], tool_choice="required", max_tokens=120)
    # the random model decides how many calls it writes: take the first seed where it writes two or more
    seed = next((s for s in range(40) if len(client.chat.completions.create(
        seed=s, **request).choices[0].message.tool_calls or []) >= 2), None)
    assert seed is not None, "no seed in 40 gave two parallel calls"
    whole = client.chat.completions.create(seed=seed, **request).choices[0]
    expected = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    for t in whole.message.tool_calls:
        _validate_call(t, ADD if t.function.name == "add" else CITY)
    chunks = list(client.chat.completions.create(seed=seed, stream=True, **request))
    content, calls, finish = _accumulate(chunks)
    assert [(name, args) for _, name, args, _ in calls] == expected and finish == "tool_calls" and content == ""
    assert all(n > 2 for *_, n in calls)  # several fragments per call, not one at the end
    assert len({i for i, *_ in calls}) == len(calls)
    # the first call's arguments were sent before the second call began
    order = [(d.index, d.id is not None) for ch in chunks for c in ch.choices for d in c.delta.tool_calls or []]
    assert order.index((1, True)) > max(k for k, (i, _) in enumerate(order) if i == 0)
    # a retried Idempotency-Key replays the stored answer: the same calls, with the ids the stream sent
    headers = {"Idempotency-Key": f"tools-{seed}"}
    sent = _accumulate(client.chat.completions.create(seed=seed, stream=True, extra_headers=headers, **request))
    assert _accumulate(client.chat.completions.create(seed=seed, stream=True, extra_headers=headers, **request)) == (
        sent[0], [[i, name, args, 1] for i, name, args, _ in sent[1]], sent[2])
    for stream_of in (client.chat.completions.stream, client.beta.chat.completions.stream):
        with stream_of(seed=seed, **request) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_completion().choices[0]
        assert kinds.count("tool_calls.function.arguments.done") == len(expected)
        assert kinds.count("tool_calls.function.arguments.delta") > 2 * len(expected)
        assert final.finish_reason == "tool_calls"
        assert [(t.function.name, t.function.arguments) for t in final.message.tool_calls] == expected


def test_a_call_cut_by_max_tokens_streams_as_content_once(wide):
    """A forced call cut by max_tokens is no call: the whole reply reaches the client as content exactly once
    (after the call deltas it was already sent), finish_reason "length", as the whole answer says."""
    client = wide.client(wide.key())
    request = dict(model="tiny-wide", messages=[{"role": "user", "content": "add 2 and 3"}], tools=[ADD],
                   tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0)
    tokens = [t.token for t in client.chat.completions.create(max_tokens=60, logprobs=True, **request)
              .choices[0].logprobs.content]
    # cut one token after the arguments began
    request["max_tokens"] = next(k for k in range(len(tokens)) if '"arguments":{' in "".join(tokens[:k])) + 1
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "length" and whole.message.tool_calls is None
    assert whole.message.content.startswith("<tool_call>")
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, **request))
    content, calls, finish = _accumulate(chunks)
    assert content == whole.message.content and finish == "length"
    assert [name for _, name, _, _ in calls] == ["add"]  # its start had gone out before the cut
    # each token's log-probability rode along, whether its text went out as content or as a call's delta
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert "".join(t.token for t in tokens) == whole.message.content and len(tokens) == request["max_tokens"]
