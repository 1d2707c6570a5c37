"""Constrained decoding (zenlm.constraints): the grammar, not the model, guarantees the output's shape,
so zenlm's tiny random model must produce JSON that validates, for greedy and seeded sampling."""
import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from zenlm import Tokenizer, TransformerConfig, TransformerLM  # noqa: E402
from zenlm.constraints import ConstraintError, compile_constraint  # noqa: E402
from zenlm.generation import GenerationConfig, Generator, generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMAS = {
    "object_required": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                        "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
              "maxItems": 4},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "y": {"type": "number", "minimum": -1, "maximum": 1}},
                  "required": ["x", "y"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["point", "ok"], "additionalProperties": False},
    "numbers_anyof_ref": {"$defs": {"v": {"type": "integer", "minimum": -15, "maximum": 10}},
                          "type": "object", "properties": {"v": {"$ref": "#/$defs/v"},
                                                           "id": {"anyOf": [{"type": "integer", "maximum": 99, "minimum": 0}, {"type": "null"}]},
                                                           "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
                          "required": ["v", "id", "code"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def lm():
    texts = [json.dumps({"name": f"n{i}", "age": i, "tags": ["a", "b"], "x": i / 7}) + " some words here"
             for i in range(300)]
    tok = Tokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    config = TransformerConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    return TransformerLM(config).eval(), tok


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_outputs_validate_greedy_and_sampled(lm, name):
    model, tok = lm
    schema = SCHEMAS[name]
    gen = Generator(model, tok)
    settings = [dict(do_sample=False)] + [dict(do_sample=True, seed=s, temperature=1.0) for s in range(20)]
    finished = 0
    for options in settings:
        out = gen.generate("Answer:", max_new_tokens=120, json_schema=schema, **options)[0]
        # a random model may loop on digits of an unbounded fraction until max_new_tokens: "length"
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
            finished += 1
        else:
            assert len(out.token_ids) == 120
    assert finished >= 12, name


def test_json_object_and_string_schema(lm):
    model, tok = lm
    finished = 0
    for seed in range(4):
        out = generate(model, "x", tok, max_new_tokens=80, json_object=True, do_sample=True, seed=seed,
                       return_output=True)[0]
        if out.finish_reason == "stop":  # a cut at max_new_tokens leaves it unfinished ("length")
            assert isinstance(json.loads(out.text), dict)
            finished += 1
        else:
            assert out.finish_reason == "length" and out.text.startswith("{")
    assert finished
    text = generate(model, "x", tok, max_new_tokens=80, json_schema=json.dumps(SCHEMAS["enum"]))
    assert json.loads(text)["color"] in ("red", "green", "blue")


def test_regex_fullmatches_and_stream_agrees(lm):
    model, tok = lm
    pattern = r"[a-c]{2,5}-[0-9]{3}"
    for seed in range(3):
        out = Generator(model, tok).generate("id:", max_new_tokens=30, regex=pattern, do_sample=True, seed=seed)[0]
        assert re.fullmatch(pattern, out.text), out.text
        streamed = "".join(Generator(model, tok).stream("id:", max_new_tokens=30, regex=pattern, do_sample=True,
                                                        seed=seed))
        assert streamed == out.text


def test_lark_and_gbnf_grammars(lm):
    model, tok = lm
    lark = 'start: "yes" | "no" | "maybe"'
    assert generate(model, "q", tok, max_new_tokens=10, grammar=lark) in ("yes", "no", "maybe")
    gbnf = 'root ::= "(" [0-9] [0-9]? ")"'
    assert re.fullmatch(r"\([0-9]{1,2}\)", generate(model, "q", tok, max_new_tokens=10, grammar=gbnf,
                                                do_sample=True, seed=1))


def test_length_cut_reports_length(lm):
    model, tok = lm
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 50}}, "required": ["text"]}
    out = Generator(model, tok).generate("x", max_new_tokens=5, json_schema=schema)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_batches_and_return_sequences_each_follow_their_grammar(lm):
    model, tok = lm
    schema = SCHEMAS["array"]
    out = Generator(model, tok).generate(["a", "longer prompt here"], max_new_tokens=40, json_schema=schema,
                                         do_sample=True, seed=3, num_return_sequences=2)
    assert len(out) == 4
    for g in out:
        jsonschema.validate(json.loads(g.text), schema)


def test_bad_inputs_raise_naming_the_problem(lm):
    model, tok = lm
    with pytest.raises(ConstraintError, match="objectx"):
        compile_constraint(tok, model.config.vocab_size, json_schema={"type": "objectx"})
    with pytest.raises(ConstraintError, match="regex"):
        compile_constraint(tok, model.config.vocab_size, regex="([a-z")
    with pytest.raises(ValueError, match="one constraint"):
        GenerationConfig(regex="a", json_object=True)
    assert compile_constraint(tok, model.config.vocab_size) is None


def test_beam_search_each_beam_follows_the_grammar(lm):
    model, tok = lm
    schema = SCHEMAS["enum"]
    out = Generator(model, tok).generate(["a", "the longer one"], max_new_tokens=20, json_schema=schema,
                                         num_beams=3, num_return_sequences=3)
    assert len(out) == 6
    for g in out:
        assert g.finish_reason == "stop", g.text
        jsonschema.validate(json.loads(g.text), schema)
    pattern = r"[ab]{2,4}"
    for g in Generator(model, tok).generate("q", max_new_tokens=8, regex=pattern, num_beams=2,
                                            num_return_sequences=2):
        assert re.fullmatch(pattern, g.text) and g.finish_reason == "stop"


def test_batched_masks_equal_each_matchers_own_bitmask(lm):
    """apply_masks (one llguidance call for every row, optionally computed ahead on the mask thread) gives
    each row exactly what its own matcher's bitmask says, stop tokens allowed only where it is complete."""
    import numpy as np

    from zenlm.constraints import apply_masks, prefetch_masks

    model, tok = lm
    vocab = model.config.vocab_size
    specs = [compile_constraint(tok, vocab, json_schema=SCHEMAS["nested"]), compile_constraint(tok, vocab, regex="[ab]{1,3}")]
    rows = [specs[i % 2].new() for i in range(6)] + [None]  # a free row rides along
    stop = [tok.eos_id, 5]
    rng = torch.Generator().manual_seed(0)
    for step in range(30):
        reference = torch.zeros(len(rows), vocab, dtype=torch.bool)
        for i, c in enumerate(rows):
            if c is None:
                reference[i] = True
                continue
            bits = np.unpackbits(np.frombuffer(c.matcher.compute_bitmask(), np.uint8), bitorder="little")[:vocab]
            row = torch.from_numpy(bits.astype(bool))
            row[c.eos] = False
            row[stop] = c.matcher.is_accepting()
            if not row.any():
                row[stop] = True
            reference[i] = row
        if step % 2:  # every other step the masks were started ahead, as while a forward runs
            prefetch_masks(rows)
        scores = apply_masks(torch.zeros(len(rows), vocab), rows, stop)
        assert torch.equal(torch.isfinite(scores), reference), step
        for i, c in enumerate(rows):
            if c is not None:
                choice = torch.multinomial(reference[i].float(), 1, generator=rng).item()
                if choice in stop:
                    rows[i] = specs[i % 2].new()
                else:
                    assert c.advance(choice)


def test_a_grammar_compiled_again_is_the_cached_one_and_states_stay_apart(lm):
    """compile_constraint keeps compiled grammars per tokenizer (a server's clients send the same schema): the
    same source gives the same spec, each new() its own state."""
    model, tok = lm
    vocab = model.config.vocab_size
    spec = compile_constraint(tok, vocab, regex="[ab]{2}")
    assert compile_constraint(tok, vocab, regex="[ab]{2}") is spec
    assert compile_constraint(tok, vocab, regex="[ab]{3}") is not spec
    one, two = spec.new(), spec.new()
    a = tok.backend.encode("a", add_special_tokens=False).ids[0]
    assert one.advance(a) and one.advance(a) and one.done and not two.done and two.accepting is False
