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
                                       max_tokens=60, temperature=1.0, seed=5, response_format=_fmt())
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
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
