"""Corpora → shards → batches: reuse, bad-data accounting, and each objective's batches."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zenlm import Tokenizer
from zenlm.data import (Batches, DataConfig, TokenShards, build_shards, chat_segments, encode_chat, load_datasets,
                        tokenizer_ids)
from zenlm.model import IGNORE_INDEX

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(text_file) -> Tokenizer:
    return Tokenizer.train([str(text_file)], kind="char", vocab_size=256)


def cfg(tmp_path, files, **kw) -> DataConfig:
    return DataConfig(train=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


def test_shards_hold_the_tokenizers_ids_and_are_reused(tmp_path, text_file, tok):
    config = cfg(tmp_path, [text_file], num_workers=2, chunk_bytes=7_000)
    shards = build_shards(config.train, tok, config, progress=False)
    assert len(shards.meta["shards"]) > 4  # several worker chunks
    assert shards.dtype == np.uint16
    expected = tok.encode(text_file.read_text(encoding="utf-8")) + [tok.eos_id]
    assert shards.num_tokens == len(expected)
    assert shards.tokens(0, shards.num_tokens).tolist() == expected
    # a range crossing shard boundaries
    b = int(shards.token_offsets[2])
    assert shards.tokens(b - 5, 10).tolist() == expected[b - 5: b + 5]
    index = shards.directory / "index.json"
    stamp = index.stat().st_mtime_ns
    again = build_shards(config.train, tok, config, progress=False)
    assert again.directory == shards.directory and index.stat().st_mtime_ns == stamp
    # a changed file is tokenized afresh
    changed = tmp_path / "other.txt"
    changed.write_text("abc\n")
    assert build_shards([str(changed)], tok, config, progress=False).directory != shards.directory


def test_large_vocabulary_uses_uint32(tmp_path):
    from tokenizers import Tokenizer as Rust, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    rust = Rust(models.WordLevel(vocab, unk_token="<pad>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(rust)
    f = tmp_path / "big.txt"
    f.write_text("w5 w69999 w65536\n")
    shards = build_shards([str(f)], tok, cfg(tmp_path, [f]), progress=False)
    assert shards.dtype == np.uint32
    assert shards.tokens(0, 3).tolist() == [7, 70001, 65538]


def test_bad_records_are_counted_per_reason_and_threshold_is_fatal(tmp_path, tok, caplog):
    f = tmp_path / "docs.jsonl"
    good = [json.dumps({"body": f"line number {i}"}) for i in range(6)]
    lines = [good[0], "{not json", good[1], "", json.dumps({"other": "x"}), good[2], json.dumps({"body": "  "}),
             good[3], "[1, 2]", good[4], good[5]]
    data = "\n".join(lines).encode() + b"\n" + b'{"body": "caf\xe9"}\n'  # latin-1 byte: invalid UTF-8
    f.write_bytes(data)
    config = cfg(tmp_path, [f], format="jsonl", text_field="body")
    with caplog.at_level("WARNING"):
        shards = build_shards(config.train, tok, config, progress=False)
    report = shards.report
    assert report.good == 6
    assert report.bad == {"malformed_json": 2, "empty": 2, "missing_field": 1, "invalid_utf8": 1}
    assert "malformed_json=2" in caplog.text and "invalid_utf8=1" in caplog.text
    assert len(shards) == 6 and shards.tokens(0, 5).tolist() == tok.encode("line ")
    config.max_bad_fraction = 0.2  # 6 bad of 12
    with pytest.raises(ValueError, match=r"6 of 12 records .*max_bad_fraction=0.2"):
        build_shards(config.train, tok, config, progress=False)


def test_pairs_tsv_and_jsonl_with_too_long_counted(tmp_path, tok):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("hello\tworld\nno tab here\nshort\t" + "x" * 50 + "\nab\tcd\tattribution\n", encoding="utf-8")
    js = tmp_path / "pairs.jsonl"
    js.write_text(json.dumps({"en": "good day", "de": "guten tag"}) + "\n", encoding="utf-8")
    config = cfg(tmp_path, [tsv], format="pairs", objective="seq2seq", max_target_len=20)
    shards = build_shards(config.train, tok, config, progress=False)
    assert shards.report.bad == {"malformed_pair": 1, "too_long": 1}
    src, tgt, _ = shards.record(0)
    assert src.tolist() == tok.encode("hello") + [tok.eos_id] and tgt.tolist() == tok.encode("world") + [tok.eos_id]
    assert shards.record(1)[1].tolist() == tok.encode("cd") + [tok.eos_id]
    # seq_len plays no part in pairs: another value reuses the same shards
    other = cfg(tmp_path, [tsv], format="pairs", objective="seq2seq", max_target_len=20, seq_len=7)
    assert build_shards(other.train, tok, other, progress=False).directory == shards.directory
    config = cfg(tmp_path, [js], format="pairs", objective="seq2seq", source_field="en", target_field="de")
    src, tgt, _ = build_shards(config.train, tok, config, progress=False).record(0)
    assert tok.decode(src) == "good day" and tok.decode(tgt) == "guten tag"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.objective"):
        DataConfig(train=["x"], objective="nope").validate()
    with pytest.raises(ValueError, match="data.format must be pairs for objective 'seq2seq'"):
        DataConfig(train=["x"], objective="seq2seq").validate()
    with pytest.raises(ValueError, match="data.mask_prob"):
        DataConfig(train=["x"], mask_prob=1.5).validate()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_shards([str(tmp_path / "missing.txt")], None, DataConfig(train=["x"]))


# --------------------------------------------------------------------------- objectives
def test_causal_batches_are_windows_of_the_stream_shuffled_by_seed(tmp_path, text_file, tok):
    config = cfg(tmp_path, [text_file], seq_len=32, val_fraction=0.1)
    data = load_datasets(config, tok, "decoder-only", seed=3, progress=False)
    stream = data.train.shards.tokens(0, data.train.shards.num_tokens)
    cut = int(len(stream) * 0.9)
    batch = data.train.batch(range(8))
    assert batch["input_ids"].shape == (8, 33) and batch["labels"] is batch["input_ids"]
    train_windows = {tuple(stream[i: i + 33]) for i in range(0, cut - 32)}
    for row in batch["input_ids"].tolist():
        assert tuple(row) in train_windows
    # same seed, same batches (fresh objects); another seed, other batches
    again = load_datasets(config, tok, "decoder-only", seed=3, progress=False)
    assert torch.equal(again.train.batch(range(8))["input_ids"], batch["input_ids"])
    other = load_datasets(config, tok, "decoder-only", seed=4, progress=False)
    assert not torch.equal(other.train.batch(range(8))["input_ids"], batch["input_ids"])
    # one epoch of packed windows visits each window once, non-overlapping, inside the train split
    starts = sorted(data.train._locate(i) for i in range(len(data.train)))
    assert len(set(starts)) == len(starts) and np.all(np.diff(starts) == 33) and starts[-1] + 33 <= cut
    # validation reads the last 10% in order
    val = data.valid.batch(range(2))["input_ids"]
    assert val[0].tolist() == stream[cut: cut + 33].tolist() and val[1].tolist() == stream[cut + 33: cut + 66].tolist()


def test_masked_lm_batches_follow_bert_15_80_10_10(tmp_path, text_file, tok):
    config = cfg(tmp_path, [text_file], seq_len=128, objective="masked")
    data = load_datasets(config, tok, "encoder-only", seed=0, progress=False)
    batch = data.train.batch(range(200))
    ids, labels = batch["input_ids"], batch["labels"]
    original = torch.stack([torch.from_numpy(data.train.shards.tokens(data.train._locate(i), 128).astype(np.int64))
                            for i in range(200)])
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], original[chosen])  # labels are the original tokens
    assert torch.equal(ids[~chosen], original[~chosen])  # unchosen tokens untouched
    special = torch.tensor(sorted(tokenizer_ids(tok)["special"]))
    assert not torch.isin(original[chosen], special).any()
    rate = chosen.float().mean().item()
    assert 0.14 < rate < 0.16
    mask_id = tok.token_to_id("<mask>")
    masked = (ids[chosen] == mask_id).float().mean().item()
    kept = (ids[chosen] == original[chosen]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.125  # kept includes random picks that hit the same token
    assert 0.08 < 1 - masked - kept < 0.12


def _infills(source: list, target: list, mask_id: int) -> bool:
    """True if target is source with each <mask> replaced by some (possibly empty) run of tokens."""
    ok = [True] + [False] * len(target)  # ok[j]: source[:i] can produce target[:j]
    for s in source:
        if s == mask_id:
            for j in range(1, len(ok)):
                ok[j] = ok[j] or ok[j - 1]
        else:
            ok = [False] + [ok[j - 1] and target[j - 1] == s for j in range(1, len(ok))]
    return ok[-1]


def test_denoising_batches_replace_poisson_spans_with_one_mask(tmp_path, text_file, tok):
    config = cfg(tmp_path, [text_file], seq_len=64, objective="denoise")
    data = load_datasets(config, tok, "encoder-decoder", seed=0, progress=False)
    batch = data.train.batch(range(300))
    mask_id, pad = tok.token_to_id("<mask>"), tok.pad_id
    assert _infills([5, mask_id, 9], [5, 6, 7, 9], mask_id) and _infills([5, mask_id, 9], [5, 9], mask_id)
    assert not _infills([5, mask_id, 9], [5, 6, 8], mask_id) and not _infills([5, 9], [5, 6, 9], mask_id)
    assert batch["labels"].shape == (300, 64)
    masked_tokens = masks = 0
    for i, (src, attn, target) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"])):
        src = src[attn.bool()].tolist()
        original = data.train.shards.tokens(data.train._locate(i), 64).tolist()
        assert target.tolist() == original  # the decoder reconstructs the window
        assert pad not in src and len(src) <= 64 and mask_id in src
        assert _infills(src, original, mask_id)
        masked_tokens += 64 - sum(1 for t in src if t != mask_id)
        masks += src.count(mask_id)
    assert 0.27 < masked_tokens / (300 * 64) < 0.33  # noise_density 0.3
    assert 2.5 < masked_tokens / masks < 3.5  # Poisson(3) span lengths


def test_seq2seq_batches_for_both_families(tmp_path, tok):
    f = tmp_path / "pairs.tsv"
    f.write_text("hi\tbonjour\nhello there\tsalut\n" * 10, encoding="utf-8")
    config = cfg(tmp_path, [f], format="pairs", objective="seq2seq", val_fraction=0.1)
    eos = tok.eos_id
    enc = load_datasets(config, tok, "encoder-decoder", seed=0, progress=False).train
    b = enc.batch([0, 1])
    for r, i in enumerate([0, 1]):
        src, tgt, _ = enc.shards.record(enc._locate(i))
        n, m = len(src), len(tgt)
        assert b["input_ids"][r, :n].tolist() == src.tolist() and b["attention_mask"][r].sum() == n
        assert b["labels"][r, :m].tolist() == tgt.tolist() and (b["labels"][r, m:] == IGNORE_INDEX).all()
        assert src[-1] == eos and tgt[-1] == eos
    dec = load_datasets(config, tok, "decoder-only", seed=0, progress=False).train
    b = dec.batch([0, 1])
    for r, i in enumerate([0, 1]):
        src, tgt, _ = dec.shards.record(dec._locate(i))
        scored = b["labels"][r][b["labels"][r] != IGNORE_INDEX].tolist()
        assert scored == tgt.tolist()  # loss on the target only
        assert b["input_ids"][r, : len(src) + len(tgt)].tolist() == src.tolist() + tgt.tolist()


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "See you."}]}


def test_chat_template_and_loss_only_on_assistant_replies(tmp_path, tok):
    pieces = chat_segments(CHAT["messages"])
    text = "".join(t for t, _ in pieces)
    assert text == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>Bye<|end|>" \
                   "<|assistant|>See you.<|end|>"
    assert chat_segments(CHAT["messages"][:2], add_generation_prompt=True)[-1] == ("<|assistant|>", False)
    ids, mask = encode_chat(tok, CHAT["messages"])
    assert ids == tok.encode(text)
    f = tmp_path / "chat.jsonl"
    bad = {"messages": [{"role": "user", "content": "only a question"}]}
    wrong = {"messages": [{"role": "robot", "content": "x"}]}
    f.write_text("\n".join(json.dumps(r) for r in [CHAT] * 9 + [bad, wrong, CHAT]) + "\n", encoding="utf-8")
    config = cfg(tmp_path, [f], format="chat", objective="chat", seq_len=200, val_fraction=0.1)
    data = load_datasets(config, tok, "decoder-only", seed=0, progress=False)
    assert data.report.bad == {"no_assistant_reply": 1, "bad_messages": 1}
    b = data.train.batch([0])
    labels = b["labels"][0]
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(scored, skip_special_tokens=False) == "Hello.<|end|>See you.<|end|>"
    assert b["input_ids"][0].tolist() == ids
    # encoder-decoder: the conversation up to the last reply is the source, the reply the target
    data = load_datasets(config, tok, "encoder-decoder", seed=0, progress=False)
    b = data.train.batch([0])
    source = tok.decode(b["input_ids"][0][b["attention_mask"][0].bool()], skip_special_tokens=False)
    assert source.endswith("<|user|>Bye<|end|><|assistant|>") and source.startswith("<|system|>")
    target = b["labels"][0][b["labels"][0] != IGNORE_INDEX]
    assert tok.decode(target, skip_special_tokens=False) == "See you.<|end|>"


GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


@pytest.mark.parametrize("workers", [1, 2])
def test_chat_objective_with_a_models_template_trains_on_its_assistant_turns(tmp_path, text_file, workers):
    """Shards of a chat file rendered with the tokenizer's own template (in worker processes too):
    loss on each reply and its <end_of_turn>, never on the headers, users or the template's wrapping;
    a conversation the template refuses is a bad record; the template is part of the cache key."""
    from tokenizers import AddedToken

    tok = Tokenizer.train([str(text_file)], kind="char", vocab_size=256)
    tok.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")])
    tok.chat_template, tok.special_tokens = GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>"}
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello. "},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    text = ("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
            "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nSee you.<end_of_turn>\n")
    ids, mask = encode_chat(tok, chat)
    assert ids == tok.encode(text) == tok.apply_chat_template(chat, return_dict=False)
    assert tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "Hello.<end_of_turn>See you.<end_of_turn>"
    f = tmp_path / "chat.jsonl"
    refused = {"messages": [{"role": "system", "content": "x"}] + chat}
    f.write_text("\n".join(json.dumps(r) for r in [{"messages": chat}] * 5 + [refused]) + "\n", encoding="utf-8")
    config = cfg(tmp_path, [f], format="chat", objective="chat", seq_len=200, num_workers=workers, chunk_bytes=400)
    data = load_datasets(config, tok, "decoder-only", seed=0, progress=False)
    assert data.report.bad == {"bad_messages": 1}
    b = data.train.batch([0])
    assert b["input_ids"][0][b["attention_mask"][0].bool()].tolist() == ids
    scored = b["labels"][0][b["labels"][0] != IGNORE_INDEX].tolist()
    assert tok.decode(scored, skip_special_tokens=False) == "Hello.<end_of_turn>See you.<end_of_turn>"
    enc = load_datasets(config, tok, "encoder-decoder", seed=0, progress=False).train.batch([0])
    source = tok.decode(enc["input_ids"][0][enc["attention_mask"][0].bool()], skip_special_tokens=False)
    assert source == text[:text.rindex("See you.")]  # the conversation up to the reply: the inference prompt
    assert source == tok.apply_chat_template(chat[:3], tokenize=False, add_generation_prompt=True)
    # another template is another cache entry, never the old shards
    tok.chat_template = GEMMA.replace("model", "assistant")
    other = load_datasets(config, tok, "decoder-only", seed=0, progress=False).train.batch([0])
    assert tok.decode(other["input_ids"][0], skip_special_tokens=False).count("<start_of_turn>assistant") == 2


def test_shards_directory_reopens(tmp_path, text_file, tok):
    config = cfg(tmp_path, [text_file])
    shards = build_shards(config.train, tok, config, progress=False)
    reopened = TokenShards(shards.directory)
    assert reopened.num_tokens == shards.num_tokens and reopened.tokens(100, 50).tolist() == shards.tokens(100, 50).tolist()
    assert isinstance(Batches(reopened, config, tokenizer_ids(tok), "decoder-only", 0), Batches)


def test_group_by_length_batches_similar_lengths_and_keeps_every_sample(tmp_path, tok):
    f = tmp_path / "pairs.tsv"
    words = "a b c d e f g h i j k l m n o p q r s t".split()
    rows = [" ".join(words[: 1 + (i * 7) % 20]) + "\t" + " ".join(words[: 1 + (i * 7 + i % 3) % 20])
            for i in range(400)]  # target lengths follow source lengths, as in translation
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    plain = load_datasets(cfg(tmp_path, [f], format="pairs", objective="seq2seq", val_fraction=0.1), tok,
                          "encoder-decoder", seed=0, progress=False).train
    grouped = load_datasets(cfg(tmp_path, [f], format="pairs", objective="seq2seq", val_fraction=0.1,
                                group_by_length=4), tok, "encoder-decoder", seed=0, progress=False).train
    grouped.group_by_length(8)
    n = len(grouped)
    for epoch in (0, 1):  # one epoch still visits every sample exactly once
        seen = sorted(grouped._locate(epoch * n + i) for i in range(n))
        assert seen == list(range(grouped.lo, grouped.hi))

    def padding(batches: Batches) -> float:
        cells = real = 0
        for start in range(0, n - 8 + 1, 8):
            b = batches.batch(range(start, start + 8))
            cells += b["input_ids"].numel() + b["labels"].numel()
            real += int(b["attention_mask"].sum()) + int((b["labels"] != IGNORE_INDEX).sum())
        return 1 - real / cells

    assert padding(grouped) < 0.5 * padding(plain)
    with pytest.raises(ValueError, match="data.group_by_length applies to records"):
        cfg(tmp_path, [f], group_by_length=4).validate()
