"""Continuous batching over sliding-window models (Mistral and Mixtral, a mixture of experts: every layer;
Gemma 3: sliding and global layers alternating): rows whose prompt + generation run past the window, joining a batch whose sliding layers
already forgot their oldest keys and leaving it, get the tokens of zenlm's Generator and of transformers'
generate(); the sliding layers' key buffers stay about two windows long however long the rows grow."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import zenlm
from zenlm.generation import Generator
from zenlm.serve.engine import BatchEngine, EngineRequest, SamplingParams

transformers = pytest.importorskip("transformers")

WINDOW = 8
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=WINDOW)
TEXTS = ["hello world, this is a small corpus", "the quick", "def serve(model): return model.generate(prompt)",
         "a", "你好世界 the lazy dog"]
LENGTHS = [30, 40, 26, 36, 20]  # prompt + generation: 2 to 6 windows


class Collector:
    def __init__(self):
        self.tokens, self.done = [], threading.Event()

    def __call__(self, event):
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        if event.finish_reason is not None:
            self.done.set()


def _serve_staggered(engine, prompts, stop: int, gap: int) -> list[Collector]:
    """Greedy requests, each submitted ``gap`` steps after the last (so rows join a running batch); their tokens."""
    outs = []
    try:
        for ids, n in zip(prompts, LENGTHS):
            c = Collector()
            engine.submit(EngineRequest(ids, SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[stop]), c))
            outs.append(c)
            start, deadline = engine.steps, time.time() + 10
            while engine.steps < start + gap and engine.batch_size and time.time() < deadline:
                time.sleep(0.001)
        for c in outs:
            assert c.done.wait(60)
    finally:
        engine.stop()
    return outs


def _build(tok, tmp_path, kind: str):
    torch.manual_seed(0)
    if kind == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=tok.vocab_size, initializer_range=0.2, **COMMON))
    elif kind == "mixtral":  # a mixture of experts as well: rows routed token by token in the shared batch
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=tok.vocab_size, initializer_range=0.2, num_local_experts=4, num_experts_per_tok=2, **COMMON))
    else:
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            vocab_size=tok.vocab_size, initializer_range=0.05, head_dim=32, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}, **COMMON))
    hf.eval().save_pretrained(tmp_path / kind)
    return hf, zenlm.load(tmp_path / kind)


@pytest.mark.parametrize("kind", ["mistral", "gemma3", "mixtral"])
def test_window_rows_joining_and_leaving_match_generator_and_transformers(kind, model_dir, tmp_path):
    tok = zenlm.load_tokenizer(model_dir)
    hf, model = _build(tok, tmp_path, kind)
    sliding = [i for i in range(model.config.num_decoder_layers) if model.config.is_sliding(i)]
    assert sliding and model.config.sliding_window == WINDOW
    eos = model.config.eos_token_id
    seen = []  # per step: (columns, the sliding layers' buffer widths, their first kept column)

    def watch(rows, seconds):  # called on the engine thread right after each step
        cache = engine.cache
        seen.append((cache.length, [cache.keys[i].size(2) for i in sliding], [cache.start(i) for i in sliding]))

    engine = BatchEngine(model, tok, max_batch_size=8, on_step=watch).start()
    prompts = [tok.encode(t) for t in TEXTS]
    outs = _serve_staggered(engine, prompts, eos, gap=2 * WINDOW)  # later rows join caches already trimmed
    gen = Generator(model, tok)
    for ids, n, c in zip(prompts, LENGTHS, outs):
        assert len(ids) + len(c.tokens) > 2 * WINDOW or eos in c.tokens
        assert c.tokens == gen.generate([ids], max_new_tokens=n)[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert c.tokens == ref
    assert len({t for c in outs for t in c.tokens}) > 5, "degenerate model: the comparison would prove little"
    # the batch ran far past the window while the sliding layers kept about two windows of keys
    assert max(length for length, _, _ in seen) > 4 * WINDOW
    assert max(w for _, widths, _ in seen for w in widths) <= 2 * WINDOW + max(map(len, prompts))
    assert max(s for _, _, starts in seen for s in starts) > 0


def test_t5_relative_positions_in_the_batch_cache_match_the_generator(model_dir, tmp_path):
    """T5's position bias is read off cache columns: rows joining a batch right-aligned behind padding
    (sources of different lengths, decoders of different ages) still get the Generator's tokens."""
    tok = zenlm.load_tokenizer(model_dir)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.vocab_size, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
        relative_attention_max_distance=12, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    with torch.no_grad():  # a fresh head favours the pad token everywhere: give it some spread
        hf.lm_head.weight.normal_(0.0, 0.5)
    hf.eval().save_pretrained(tmp_path / "t5")
    model = zenlm.load(tmp_path / "t5")
    engine = BatchEngine(model, tok, max_batch_size=8).start()
    prompts = [tok.encode(t) for t in TEXTS]
    outs = _serve_staggered(engine, prompts, 1, gap=5)
    gen = Generator(model, tok)
    for ids, n, c in zip(prompts, LENGTHS, outs):
        assert c.tokens == gen.generate([ids], max_new_tokens=n)[0].token_ids
    assert len({t for c in outs for t in c.tokens}) > 5 and max(len(c.tokens) for c in outs) > 12
