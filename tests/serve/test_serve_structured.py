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
    yield r
    r.stop()


@pytest.mark.parametrize("model", ["llama31-json", "hermes", "mistral"])
def test_forced_calls_through_real_tool_templates(templated, model):
    client = templated.client(templated.key())
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "add 2 and 3"}],
                                       tools=[ADD, CITY], max_tokens=80, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    _validate_call(r.choices[0].message.tool_calls[0], ADD)
    # "auto": the random model writes whatever it likes; what does not parse is content, never an error
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], tools=[ADD],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content is not None


def test_tools_for_a_template_without_them_is_a_400_naming_why(templated):
    with pytest.raises(openai.BadRequestError) as err:
        templated.client(templated.key()).chat.completions.create(
            model="llama3-plain", messages=[{"role": "user", "content": "x"}], tools=[ADD], max_tokens=4)
    assert "does not render tools" in err.value.message and err.value.body["param"] == "tools"
