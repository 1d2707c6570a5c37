"""Code completion: samples stop at the next top-level statement; the parse share is ast's verdict."""
import ast

import pytest
from tiny_app_models import save_tiny

from zenlm import load, load_tokenizer
from zenlm.tasks.code import complete, definition_prompts, parse_share, parses, sample_definitions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_share_agrees_with_ast():
    prompts = ["def f(x):\n", "def g():\n", "class A:\n"]
    completions = ["    return x + 1\n", "    return (\n", "    pass\n"]
    expected = []
    for p, c in zip(prompts, completions):
        try:
            ast.parse(p + c)
            expected.append(True)
        except SyntaxError:
            expected.append(False)
    assert parse_share(prompts, completions) == sum(expected) / 3 == 2 / 3
    assert parses("x = '\\d'\n")  # a warning, not a failure


def test_definition_prompts_and_completion_stops(tmp_path):
    source = 'import os\n\ndef a(x, y):\n    """Add."""\n    return x + y\n\n@property\ndef b():\n    pass\n\ndef c(z):\n    return z\n'
    assert definition_prompts(source) == ["def a(x, y):\n", "def c(z):\n"]
    path = save_tiny(tmp_path / "m", "decoder-only")
    model, tok = load(path), load_tokenizer(path)
    outs = complete(model, tok, ["def a(x, y):\n", "def c(z):\n"], max_new_tokens=20, seed=0)
    assert len(outs) == 2 and all("\ndef " not in o and "\nclass " not in o for o in outs)
    assert outs == complete(model, tok, ["def a(x, y):\n", "def c(z):\n"], max_new_tokens=20, seed=0)
    gens = sample_definitions(model, tok, ["def a(x, y):\n", "def c(z):\n"], max_new_tokens=20, seed=0)
    assert [g.text for g in gens] == outs  # the same samples, with why each ended
    for g in gens:  # a sample shorter than the budget ended at a stop; one cut by the budget used all of it
        assert g.finish_reason == "stop" if len(g.token_ids) < 20 else g.finish_reason in ("stop", "length")
