"""zenlm.retrieval.rag: ask() retrieves, cites and fits the passages into the generator's window."""
from __future__ import annotations

import pytest

import zenlm
from zenlm.retrieval import Index, ask

from .conftest import docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ask_cites_retrieved_passages(tmp_path, embedder, generator_dir):
    index = Index.build(tmp_path / "ix", docs(), embedder)
    gen = zenlm.load(generator_dir)
    tok = zenlm.load_tokenizer(generator_dir)
    answer = ask(index, gen, "What do volcanoes do?", k=3, tokenizer=tok, max_new_tokens=8)
    retrieved = [h.id for h in index.search("What do volcanoes do?", k=3)]
    assert answer.citations == retrieved[:len(answer.citations)] and answer.citations
    assert "d7" in answer.citations
    for h in answer.passages:
        assert f"[{h.id}]" in answer.prompt
    assert len(tok.encode(answer.prompt, add_special_tokens=True)) <= 256 - 8
    with pytest.raises(ValueError, match="question is empty"):
        ask(index, gen, " ", tokenizer=tok)
    # a window too small for all passages: they are shortened and the loss is counted
    small = ask(index, gen, "volcanoes", k=5, tokenizer=tok, max_new_tokens=100)
    assert small.dropped_tokens > 0 and small.passages
    assert len(tok.encode(small.prompt, add_special_tokens=True)) <= 256 - 100
