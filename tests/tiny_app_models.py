"""Tiny saved models with real tokenizers for the application tests (translate, chat, finetune).

Random weights: the tests check plumbing against independent references (the
generation engine itself, sacrebleu), never the quality of a random model."""
from pathlib import Path

import torch

from zenlm import Tokenizer, TransformerConfig, TransformerLM
from zenlm.checkpoint import save_pretrained

TEXTS = ["A man rides a bike.", "Ein Mann fährt Fahrrad.", "Two dogs play in the snow.", "Zwei Hunde spielen im Schnee.",
         "Hello, how are you today?", "I am fine, thank you!", "床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"] * 4


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=200, kind="char")


def save_tiny(directory: Path, family: str = "encoder-decoder", extra: dict | None = None, hidden: int = 32,
              seed: int = 0, window: int = 96) -> Path:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_attention_heads=4, num_encoder_layers=2 if family == "encoder-decoder" else 0,
                               num_decoder_layers=2, max_position_embeddings=window, pad_token_id=tok.pad_id,
                               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, extra=dict(extra or {}))
    model = TransformerLM(config).eval()
    save_pretrained(model, directory, tokenizer=tok)
    return Path(directory)
