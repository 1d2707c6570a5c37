"""The retrieval commands end to end: index build / delete, search, evaluate retrieval and ask."""
from __future__ import annotations

import json

import pytest

from zenlm.cli import main

from .conftest import docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_build_search_evaluate_ask(tmp_path, model_dir, generator_dir, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.id, "text": d.text}) + "\n" for d in docs()))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "magma volcano", "metadata": {"x": 1}})
                                            + "\n" + json.dumps({"_id": "q2", "text": "symphony orchestra"}) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\r\nq1\td7\t1\r\nq2\td10\t1\r\n")
    ix = str(tmp_path / "ix")
    assert main(["index", "build", str(corpus), "--model", str(model_dir), "--out", ix]) == 0
    assert "12 documents" in capsys.readouterr().out
    assert main(["search", ix, "volcanoes and magma", "-k", "2", "--mode", "bm25", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["id"] == "d7" and hits[0]["rank"] == 1 and len(hits) <= 2
    assert main(["evaluate", "retrieval", ix, "--queries", str(tmp_path / "queries.jsonl"),
                 "--qrels", str(tmp_path / "qrels.tsv"), "--mode", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("nDCG@10") == 3 and "bm25: nDCG@10 1.0000" in out
    assert main(["ask", ix, str(generator_dir), "Why do volcanoes erupt?", "--max-new-tokens", "4"]) == 0
    assert "sources: " in capsys.readouterr().out
    # rerun on the existing index: an update, not a rebuild
    assert main(["index", "build", str(corpus), "--model", str(model_dir), "--out", ix]) == 0
    assert "(0 added, 12 updated" in capsys.readouterr().out
    assert main(["index", "delete", ix, "d0", "zz"]) == 0
    assert "deleted 1; 11 documents left; not found: zz" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "missing"), "q"]) == 2
    assert main(["index", "build", str(tmp_path / "none.txt"), "--out", ix]) == 2
