"""Tokenizer: training kinds, lossless round trips, batches, streaming, files."""
import pytest

from zenlm import Tokenizer
from zenlm.tokenizer import SPECIAL_TOKENS

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 加法\n",
    "这是一个测试。机器翻译和对话系统。",
    "Emoji 🎉🚀 and accents: café naïve — “quotes”.",
] * 50
SAMPLES = ["Hello, world! The fox.", "这是一个测试", "party 🎉🚀 time 👩‍👩‍👧", "def f(x):\n\treturn x ** 2  # square\n",
           "  leading and trailing spaces  ", "mixed 中文 and English 😀"]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(CORPUS, vocab_size=400, kind="bpe")


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.token_to_id("<unk>") not in ids


def test_char_tokenizer_round_trips_and_maps_unseen_to_unk():
    tok = Tokenizer.train(CORPUS, vocab_size=500, kind="char")
    for text in ("The lazy dog.\n", "这是一个测试", "🎉🚀"):
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    assert tok.encode("Ω")[0] == tok.token_to_id("<unk>")


def test_unigram_tokenizer_round_trips():
    tok = Tokenizer.train(CORPUS, vocab_size=120, kind="unigram")
    assert tok.decode(tok.encode("The quick brown fox")) == "The quick brown fox"


def test_special_tokens_have_fixed_ids_and_are_single_tokens(bpe):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(t) == i
    ids = bpe.encode("<|user|>hi<|end|>")
    assert ids[0] == bpe.token_to_id("<|user|>") and ids[-1] == bpe.token_to_id("<|end|>")
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)


def test_batch_encode_pads_and_masks(bpe):
    batch = bpe.encode_batch(["a b c d e f", "a"], padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].sum() == len(bpe.encode("a")) and ids[1, -1] == bpe.pad_id
    left = bpe.encode_batch(["a b c d e f", "a"], padding_side="left")
    assert left["attention_mask"][1, 0] == 0 and left["attention_mask"][1, -1] == 1


def test_batch_encode_never_truncates_silently(bpe):
    with pytest.raises(ValueError, match="longer than max_length=3"):
        bpe.encode_batch(["one two three four five"], max_length=3)
    cut = bpe.encode_batch(["one two three four five"], max_length=3, truncation=True)
    assert cut["input_ids"].shape == (1, 3)


def test_stream_decoder_never_emits_half_a_character(bpe):
    text = "中文🎉 ok 👩‍👩‍👧"
    stream = bpe.stream_decoder()
    pieces = []
    for i in bpe.encode(text):  # byte-level: an emoji spans several tokens
        delta = stream.push(i)
        assert "\ufffd" not in delta
        pieces.append(delta)
    assert "".join(pieces) == text


def test_save_and_load(tmp_path, bpe):
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("这是一个测试 🎉") == bpe.encode("这是一个测试 🎉")
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        Tokenizer.train(CORPUS, kind="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must be an integer > 9"):
        Tokenizer.train(CORPUS, vocab_size=5)


def test_training_16k_bpe_on_megabytes_is_fast(tmp_path):
    """Seconds, not minutes (the speed itself is a benchmark; here: it finishes and is used fully)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(30000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(20000)))
    tok = Tokenizer.train([str(path)], vocab_size=16000)
    assert tok.vocab_size == 16000


def test_chat_template_and_special_tokens_save_and_load(tmp_path, bpe):
    import json
    import subprocess
    import sys

    template = "{% for m in messages %}{{ bos_token }}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    tok = Tokenizer(bpe.backend, chat_template=template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    tok.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == template
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    again = Tokenizer.load(tmp_path)
    assert again.chat_template == template and again.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages, tokenize=False) == "<s><|user|>hi<|end|>"
    assert again.apply_chat_template(messages, return_dict=False) == bpe.encode("<s><|user|>hi<|end|>")
    # zenlm's own tokenizers: no files beside tokenizer.json, and its <|role|> template by default
    bpe.save(tmp_path / "own")
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["tokenizer.json"]
    own = Tokenizer.load(tmp_path / "own")
    assert not own.has_chat_template and own.stop_token_ids == [own.token_to_id("<|end|>")]
    assert own.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<|user|>hi<|end|><|assistant|>"
    # jinja2 is imported only when a template is rendered
    code = "import sys, zenlm, zenlm.tokenizer, zenlm.data, zenlm.tasks.chat; print('jinja2' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
