"""zenlm.retrieval.corpora: documents, queries and qrels in their formats (text, JSONL, TSV, SMART, TREC,
Cranfield), non-UTF-8 input, and the real collections under shared/data."""
from __future__ import annotations

import gzip
import json

import pytest

from zenlm.cli import main
from zenlm.retrieval import read_documents, read_qrels, read_queries

from .conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_read_documents_formats_and_non_utf8(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("First paragraph about cats.\n\nSecond paragraph about dogs.\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    rows = [{"_id": "c1", "title": "T", "text": "body one", "metadata": {"k": 1}}, {"_id": "c2", "text": "body two"}]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    (tmp_path / "d.tsv").write_text("t1\tsome tab text\n")
    found, skipped = read_documents([tmp_path])
    ids = {d.id: d for d in found}
    assert set(ids) == {"a.txt", "c1", "c2", "t1"}
    assert ids["c1"].content == "T body one" and ids["c1"].metadata == {"k": 1}
    assert [s.path for s in skipped] == [str(tmp_path / "bad.txt"), f"{tmp_path / 'corpus.jsonl.gz'}:3"]
    assert "not UTF-8 (byte 0xe9 at offset 3)" in skipped[0].reason
    long = tmp_path / "long.md"
    long.write_text("\n\n".join(" ".join(["word"] * 120) for _ in range(3)))
    assert [d.id for d in read_documents([long], passage_words=200)[0]] == ["long.md#0", "long.md#1", "long.md#2"]
    # the CLI indexes the rest and names the bad file
    assert main(["index", "build", str(tmp_path / "a.txt"), str(tmp_path / "bad.txt"), "--out",
                 str(tmp_path / "ix")]) == 0
    captured = capsys.readouterr()
    assert f"warning: {tmp_path / 'bad.txt'}: not UTF-8" in captured.err
    assert "1 documents" in captured.out


def test_smart_and_qrels_formats(tmp_path):
    (tmp_path / "q.qry").write_text(".I 001\n.W\nfirst query\ntext .\n.I 004\n.W\nsecond query .\n")
    assert read_queries(tmp_path / "q.qry") == {"1": "first query text .", "2": "second query ."}
    (tmp_path / "docs.all").write_text(".I 1\n.T\ntitle one\n.A\nsmith\n.W\ntitle one\nbody text .\n.I 2\n.W\nmore\n")
    found, _ = read_documents([tmp_path / "docs.all"])
    assert [(d.id, d.text, d.metadata.get("title")) for d in found] == [("1", "title one body text .", "title one"),
                                                                         ("2", "more", None)]
    (tmp_path / "beir.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td2\t2\r\n")
    assert read_qrels(tmp_path / "beir.tsv") == {"q1": {"d1": 1, "d2": 2}}
    (tmp_path / "trec").write_text("1 0 d1 3\n1 0 d2 0\n")
    assert read_qrels(tmp_path / "trec") == {"1": {"d1": 3, "d2": 0}}
    (tmp_path / "cranqrel").write_text("1 184 2 \n1 29 -1\n2 12 4\n")
    assert read_qrels(tmp_path / "cranqrel", "cranfield") == {"1": {"184": 3}, "2": {"12": 1}}
    with pytest.raises(ValueError, match="cannot tell the qrels format"):
        read_qrels(tmp_path / "cranqrel")
    with pytest.raises(ValueError, match="unknown qrels format 'xml'"):
        read_qrels(tmp_path / "trec", "xml")


def test_real_collections_parse():
    """The shared data as its READMEs describe it (counts, CRLF, Cranfield's -1 and numbering)."""
    scifact = read_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    assert len(scifact) == 300 and sum(map(len, scifact.values())) == 339
    cran = read_qrels(DATA / "cranfield" / "cranqrel", "cranfield")
    # 1,837 judgements (wc -l says 1,836: no final newline), one -1 per query dropped
    assert sum(map(len, cran.values())) == 1837 - 225 and len(cran) == 225
    queries = read_queries(DATA / "cranfield" / "cran.qry")
    assert len(queries) == 225 and set(cran) <= set(queries)
    nf = read_qrels(DATA / "nfcorpus" / "beir-test" / "qrels" / "test.tsv")
    assert len(nf) == 323 and sum(map(len, nf.values())) == 12334
