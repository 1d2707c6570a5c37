"""Continuous batching gives each request exactly what it would get alone, whoever shares its batch."""
from __future__ import annotations

import threading
import time

import pytest

import zenlm
from zenlm.generation import Generator
from zenlm.serve.engine import BatchEngine, EngineRequest, SamplingParams
from zenlm.serve.errors import Overloaded, RateLimited


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]


@pytest.fixture(scope="module")
def lm(model_dir):
    return zenlm.load(model_dir), zenlm.load_tokenizer(model_dir)


def run_staggered(engine, prompts, params, gap_steps=3):
    """Submit each prompt a few decoding steps after the previous one, so rows join a running batch."""
    outs = []
    for ids, p in zip(prompts, params):
        c = Collector()
        engine.submit(EngineRequest(ids, p, c))
        outs.append(c)
        start = engine.steps
        deadline = time.time() + 5
        while engine.steps < start + gap_steps and time.time() < deadline and engine.batch_size:
            time.sleep(0.001)
    for c in outs:
        assert c.done.wait(30)
    return outs


def test_greedy_rows_joining_and_leaving_match_the_generator(lm):
    model, tok = lm
    sizes = []
    engine = BatchEngine(model, tok, max_batch_size=8, on_step=lambda rows, dt: sizes.append(rows)).start()
    try:
        prompts = [tok.encode(t) for t in ["hello", "the quick brown fox jumps over", "def serve(model):",
                                           "你好世界", "a", "0123456789 the lazy dog; hello world"]]
        lengths = [12, 30, 5, 20, 25, 9]  # rows leave at different steps, others keep going
        params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
        outs = run_staggered(engine, prompts, params)
        assert max(sizes) >= 3 and len(sizes) < sum(n - 1 for n in lengths)  # they really shared steps
        gen = Generator(model, tok)
        for ids, n, c in zip(prompts, lengths, outs):
            ref = gen.generate([ids], max_new_tokens=n)[0]
            assert c.tokens == ref.token_ids
            assert c.text == ref.text
    finally:
        engine.stop()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(lm):
    model, tok = lm
    engine = BatchEngine(model, tok, max_batch_size=8).start()
    try:
        prompts = [tok.encode("hello world"), tok.encode("the quick brown"), tok.encode("fox")]
        params = [SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=7 + i) for i in range(3)]
        together = run_staggered(engine, prompts, params, gap_steps=2)
        alone = []
        for ids, p in zip(prompts, params):
            c = Collector()
            engine.submit(EngineRequest(ids, p, c))
            assert c.done.wait(30)
            alone.append(c)
        assert [c.tokens for c in together] == [c.tokens for c in alone]
        assert len({tuple(c.tokens) for c in alone}) == 3
    finally:
        engine.stop()


def test_stop_tokens_stop_strings_and_max_tokens(lm):
    model, tok = lm
    engine = BatchEngine(model, tok).start()
    try:
        ids = tok.encode("hello")
        free = Collector()
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=20, temperature=0), free))
        free.done.wait(30)
        assert free.events[-1].finish_reason == "length" and len(free.tokens) == 20
        first = free.tokens[3]
        by_token = Collector()
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[first]), by_token))
        by_token.done.wait(30)
        assert by_token.tokens == free.tokens[:free.tokens.index(first) + 1]
        assert by_token.events[-1].finish_reason == "stop"
        if len(free.text) > 4:
            stop = free.text[3:5]
            by_text = Collector()
            engine.submit(EngineRequest(ids, SamplingParams(max_tokens=20, temperature=0, stop=[stop]), by_text))
            by_text.done.wait(30)
            assert by_text.text == free.text[:free.text.find(stop)]
            assert by_text.events[-1].finish_reason == "stop"
    finally:
        engine.stop()


def test_cancel_frees_the_slot_and_full_queue_is_overloaded(lm):
    model, tok = lm
    engine = BatchEngine(model, tok, max_batch_size=1, max_queue=1).start()
    try:
        long = Collector()
        req = engine.submit(EngineRequest(tok.encode("hello"), SamplingParams(max_tokens=100, temperature=0), long))
        while not long.events:
            time.sleep(0.001)
        queued = Collector()
        engine.submit(EngineRequest(tok.encode("hi"), SamplingParams(max_tokens=3, temperature=0), queued))
        with pytest.raises(Overloaded) as e:
            engine.submit(EngineRequest(tok.encode("x"), SamplingParams(max_tokens=3), Collector()))
        assert e.value.status == 503 and e.value.headers["retry-after"]
        req.cancel()
        assert long.done.wait(5) and long.events[-1].finish_reason == "cancelled"
        assert len(long.tokens) < 100
        assert queued.done.wait(10) and queued.events[-1].finish_reason == "length"
    finally:
        engine.stop()


def test_window_is_checked_at_submit(lm):
    model, tok = lm
    engine = BatchEngine(model, tok)
    with pytest.raises(ValueError, match="context window of 128"):
        engine.submit(EngineRequest([5] * 100, SamplingParams(max_tokens=40), Collector()))


def test_encoder_decoder_rows_batch_with_their_own_sources(seq2seq_dir):
    model, tok = zenlm.load(seq2seq_dir), zenlm.load_tokenizer(seq2seq_dir)
    sizes = []
    engine = BatchEngine(model, tok, max_batch_size=8, on_step=lambda rows, dt: sizes.append(rows)).start()
    try:
        sources = [tok.encode(t) for t in ["hello world", "the quick brown fox jumps over the lazy dog",
                                           "def serve(model):", "你好世界", "a"]]
        lengths = [10, 20, 6, 15, 12]
        stop = [model.config.eos_token_id]
        params = [SamplingParams(max_tokens=n, temperature=0, stop_token_ids=stop) for n in lengths]
        outs = run_staggered(engine, sources, params, gap_steps=2)
        assert max(sizes) >= 2
        gen = Generator(model, tok)
        for ids, n, c in zip(sources, lengths, outs):
            ref = gen.generate([ids], max_new_tokens=n)[0]
            assert c.tokens == ref.token_ids
            assert c.text == ref.text
    finally:
        engine.stop()


def test_a_request_is_queued_whole_or_not_at_all(lm):
    model, tok = lm
    engine = BatchEngine(model, tok, max_batch_size=2, max_queue=4)  # not started: nothing is admitted
    ids = tok.encode("hi")

    def reqs(k):
        return [EngineRequest(ids, SamplingParams(max_tokens=2), Collector()) for _ in range(k)]

    assert (engine.capacity, engine.share) == (6, 4)
    engine.submit_all(reqs(4), owner="a")
    with pytest.raises(RateLimited, match="at most 4") as e:  # a's share is full; b's room is kept
        engine.submit_all(reqs(1), owner="a")
    assert e.value.status == 429 and e.value.headers["retry-after"]
    with pytest.raises(Overloaded, match="capacity") as e:  # 3 more would pass 6: refused whole
        engine.submit_all(reqs(3), owner="b")
    assert e.value.status == 503 and engine.queue_depth == 4
    with pytest.raises(Overloaded, match="needs 7 sequences"):
        engine.submit_all(reqs(7), owner="c")
    engine.submit_all(reqs(2), owner="b")
    assert engine.queue_depth == 6


def test_free_slots_go_round_robin_over_keys(lm):
    """Key a queues ten requests, then key b one: b's is admitted second, not eleventh."""
    model, tok = lm
    order = []
    engine = BatchEngine(model, tok, max_batch_size=1, max_queue=32)
    collectors = []
    for owner, n in (("a", 10), ("b", 1)):
        for j in range(n):
            c = Collector()
            collectors.append(c)
            engine.submit(EngineRequest(tok.encode("hello"), SamplingParams(max_tokens=3, temperature=0),
                                        lambda ev, c=c, name=f"{owner}{j}": (order.append(name) if ev.finish_reason
                                                                             else None, c(ev))), owner=owner)
    engine.start()
    try:
        for c in collectors:
            assert c.done.wait(30)
    finally:
        engine.stop()
    assert order[:3] == ["a0", "b0", "a1"] and len(order) == 11
    assert engine._in_flight == {}  # every finished sequence gave its owner's share back
