"""PII scrubber: precision and recall on the labelled set in tests/data, the checksums against
hand-computed values, placeholders, streaming, and bad input."""
import json
from pathlib import Path

import pytest

from zenlm.privacy import PIIScrubber, find_pii, luhn_valid, scrub, scrub_stream, valid_cn_id

LABELLED = Path(__file__).parent / "data" / "pii_labelled.jsonl"


def test_precision_and_recall_on_the_labelled_set():
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 100 and sum(not r["pii"] for r in rows) >= 30  # negatives are part of the set
    tp = fp = fn = 0
    per_kind = {}
    for r in rows:
        gold = {(p["kind"], p["text"]) for p in r["pii"]}
        pred = {(m.kind, m.text) for m in find_pii(r["text"])}
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
        for kind, _ in gold:
            per_kind.setdefault(kind, 0)
            per_kind[kind] += 1
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    assert set(per_kind) == {"EMAIL", "PHONE", "CN_ID", "CARD", "IP"}
    assert precision >= 0.95, (precision, tp, fp)
    assert recall >= 0.95, (recall, tp, fn)


def test_cn_id_checksum_by_hand():
    # 11010519491231002X: weights 7,9,10,5,8,4,2,1,6,3,7,9,10,5,8,4,2 over the first 17 digits
    # sum = 1*7+1*9+0+1*5+0+5*4+1*2+9*1+4*6+9*3+1*7+2*9+3*10+1*5+0+0+2*2 = 167; 167 % 11 = 2 -> "10X98765432"[2] = X
    assert valid_cn_id("11010519491231002X")
    assert valid_cn_id("11010519491231002x")
    assert not valid_cn_id("110105194912310021")  # wrong check character
    assert not valid_cn_id("110105194902300025")  # 30 February
    assert find_pii("证件 11010519491231002X 已核验")[0].kind == "CN_ID"


def test_luhn_by_hand():
    assert luhn_valid("79927398713")  # the textbook example
    assert not luhn_valid("79927398710")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_placeholders_and_surrounding_text_kept():
    text = "Mail ann@example.com or call +44 20 7946 0958; card 4111-1111-1111-1111 from 10.0.0.1."
    assert scrub(text) == "Mail <EMAIL> or call <PHONE>; card <CARD> from <IP>."
    assert scrub(text, kinds=["EMAIL"]) == text.replace("ann@example.com", "<EMAIL>")
    assert scrub("手机13800138000，邮箱a@b.cn", placeholder="[{kind}]") == "手机[PHONE]，邮箱[EMAIL]"
    assert scrub("nothing to see, version 1.2.3.4.5") == "nothing to see, version 1.2.3.4.5"


def test_streaming_is_lazy_and_counts():
    seen = []

    def source():
        for t in ["a@b.io", "plain", "fe80::1 and 8.8.8.8"]:
            seen.append(t)
            yield t

    it = scrub_stream(source())
    assert seen == []  # nothing read until asked
    assert next(it) == "<EMAIL>" and seen == ["a@b.io"]
    assert list(it) == ["plain", "<IP> and <IP>"]
    step = PIIScrubber()
    list(step.stream(["x@y.io z@w.io", "13912345678"]))
    assert step.counts == {"EMAIL": 2, "PHONE": 1}


def test_bad_input():
    with pytest.raises(ValueError, match="unknown PII kind 'SSN'"):
        scrub("x", kinds=["SSN"])
    with pytest.raises(ValueError, match="must be a str"):
        find_pii(b"bytes")


def test_data_pipeline_scrubs_before_tokenizing(tmp_path):
    from zenlm import Tokenizer
    from zenlm.data import DataConfig, build_shards

    raw = "write to ann@example.com or call +44 20 7946 0958 today\n"
    (tmp_path / "train.txt").write_text(raw * 3)
    tok = Tokenizer.train([raw, scrub(raw)], kind="char", vocab_size=128)
    for flag in (False, True):
        config = DataConfig(train=[str(tmp_path / "train.txt")], scrub_pii=flag, num_workers=1,
                            cache_dir=str(tmp_path / "cache"))
        shards = build_shards(config.train, tok, config, progress=False)
        text = tok.decode(shards.tokens(0, shards.num_tokens).tolist())
        if flag:
            assert "ann@example.com" not in text and text.count("<EMAIL>") == 3 and text.count("<PHONE>") == 3
        else:  # off by default, and the two settings never share cached shards
            assert text.count("ann@example.com") == 3
