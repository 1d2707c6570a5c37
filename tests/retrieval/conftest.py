"""Shared by the retrieval tests: a dozen short documents, a BPE tokenizer trained on them, tiny random
encoder and generator models saved to disk, and the path to the shared data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zenlm import TransformerConfig, TransformerLM, TransformerModel, Tokenizer
from zenlm.retrieval import Document, Embedder

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

TEXTS = [
    "The cat sat on the warm mat by the fire.",
    "Dogs love running in the park every morning.",
    "Quantum computers use qubits to store information.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
    "A recipe for bread needs flour, water, yeast and salt.",
    "The rocket launched from the coast carrying a weather satellite.",
    "Volcanoes erupt when magma rises through the crust.",
    "Chess players study openings, tactics and endgames.",
    "Rain forests hold a large share of the world's species.",
    "The orchestra played a symphony by Beethoven last night.",
    "Glaciers are retreating as global temperatures climb.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, vocab_size=300, kind="bpe", min_frequency=1)


def tiny_encoder(vocab: int, hidden: int = 32, seed: int = 0, family: str = "encoder-only") -> TransformerModel:
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_attention_heads=4, num_encoder_layers=2 if family == "encoder-only" else 0,
                               num_decoder_layers=0 if family == "encoder-only" else 2,
                               max_position_embeddings=128)
    return TransformerModel(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("encoder")
    Embedder(tiny_encoder(tokenizer.vocab_size), tokenizer, name="tiny").save(path)
    return path


@pytest.fixture
def embedder(model_dir) -> Embedder:
    return Embedder.load(model_dir)


def docs(n: int = len(TEXTS)) -> list[Document]:
    return [Document(f"d{i}", t, metadata={"n": i}) for i, t in enumerate(TEXTS[:n])]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_encoder_layers=0, num_decoder_layers=2,
                               max_position_embeddings=256)
    path = tmp_path_factory.mktemp("generator")
    TransformerLM(config).save_pretrained(path, tokenizer=tokenizer)
    return path
