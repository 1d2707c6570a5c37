"""`zenlm index`, `search` (cli/retrieval.py): the hits printed are the library's ``format_hits``."""
import json

import pytest

from zenlm.cli import main


def test_search_prints_the_library_format_of_the_hits(tmp_path, capsys):
    pytest.importorskip("bm25s", reason="the retrieval extra is not installed")
    from zenlm.retrieval.index import Index, format_hits

    (tmp_path / "a.txt").write_text("alpha beta gamma\n")
    (tmp_path / "b.txt").write_text("delta beta\n")
    index = str(tmp_path / "idx")
    assert main(["index", "build", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", index]) == 0
    capsys.readouterr()
    with Index.open(index) as opened:
        hits = opened.search("beta", k=10, mode="bm25")
    assert main(["search", index, "beta"]) == 0
    assert capsys.readouterr().out == format_hits(hits) + "\n"
    assert main(["search", index, "beta", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["rank"], r["id"]) for r in rows] == [(1, hits[0].id), (2, hits[1].id)]
    assert main(["search", index, "zzzz"]) == 0 and capsys.readouterr().out == ""  # no hits: nothing printed
