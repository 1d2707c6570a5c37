"""The decoding engine, specified: strategies against full-forward references, batching,
sampling seeds, logits rules against transformers' processors, stop rules, streaming, bad input."""
import math

import pytest
import torch

from zenlm import TransformerConfig, TransformerLM
from zenlm.generation import (GenerationConfig, Generator, apply_bad_words, apply_min_p, apply_no_repeat_ngram,
                            apply_repetition_penalty, apply_top_k, apply_top_p, generate)

VOCAB = 61


def small(family: str, **kw) -> TransformerConfig:
    layers = dict(enc=(2, 2), dec=(0, 2), llama=(0, 2))[family]
    flavour = dict(llama=dict(norm="rmsnorm", activation="swiglu", position="rotary", bias=False,
                              num_key_value_heads=2, tie_word_embeddings=False),
                   # (post-LN random models collapse to one repeated token, so pre-LN here; BART's
                   # post-LN is covered against transformers in tests/parity)
                   enc=dict(position_offset=2, lm_head_bias=True, tie_word_embeddings=False)).get(family, {})
    # a wide init gives peaked, varied next-token distributions (random 0.02-init models repeat one token)
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_encoder_layers=layers[0], num_decoder_layers=layers[1], max_position_embeddings=48,
                initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return TransformerConfig(**{**base, **flavour, **kw})


def build(family: str = "dec", seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(small(family, **kw)).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24]]
FAMILIES = ["dec", "enc", "llama"]


@torch.no_grad()
def full_logits(model: TransformerLM, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Next-token logits from one full forward pass, no cache: the reference."""
    if model.config.is_encoder_decoder:
        dec = torch.tensor([[model.config.start_token_id] + generated])
        return model(torch.tensor([prompt]), dec).logits[0, -1]
    return model(torch.tensor([prompt + generated])).logits[0, -1]


def strip_stop(tokens: list[int], stop: int = 2) -> list[int]:
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


# --------------------------------------------------------------------------- greedy and the cache
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_kv_cache_equals_full_forward_argmax(family):
    model = build(family)
    out = Generator(model).generate(PROMPTS[0], max_new_tokens=12)
    ref = []
    for _ in range(12):
        ref.append(int(full_logits(model, PROMPTS[0], ref).argmax()))
        if ref[-1] == 2:
            break
    assert out.token_ids[0] == ref
    assert len(set(ref)) > 2  # the reference is not a degenerate repeat


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_prompts_equal_unbatched(family, beams):
    model = build(family)
    gen = Generator(model)
    batched = gen.generate(PROMPTS, max_new_tokens=10, num_beams=beams).token_ids
    alone = [gen.generate(p, max_new_tokens=10, num_beams=beams).token_ids[0] for p in PROMPTS]
    assert batched == alone


@pytest.mark.parametrize("family", ["dec", "enc"])
def test_large_batches_agree_with_rows_decoded_alone(family):
    """16 prompts of different lengths in one batch: each row's tokens and log-probs as if alone."""
    model = build(family)
    torch.manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (int(n),)).tolist() for n in torch.randint(2, 9, (16,))]
    batched = Generator(model).generate(prompts, max_new_tokens=6, logprobs=True)
    for prompt, gen in zip(prompts, batched):
        alone = Generator(model).generate(prompt, max_new_tokens=6, logprobs=True)[0]
        assert gen.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(gen.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["dec", "enc"])
def test_logprobs_are_the_model_distribution(family):
    model = build(family)
    out = Generator(model).generate(PROMPTS[1], max_new_tokens=6, logprobs=True)[0]
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = full_logits(model, PROMPTS[1], out.token_ids[:i]).log_softmax(-1)[tok]
        assert math.isclose(lp, float(ref), abs_tol=1e-4)


def test_finished_rows_leave_the_batch():
    model = build("dec")
    first = Generator(model).generate(PROMPTS, max_new_tokens=8).token_ids
    stop = first[1][0]  # row 1 stops at its first token
    sizes = []
    decode = model.decode

    def spy(ids, *a, **k):
        sizes.append(ids.size(0))
        return decode(ids, *a, **k)

    model.decode = spy
    out = Generator(model).generate(PROMPTS, max_new_tokens=8, stop_token_ids=[stop])
    assert out.token_ids[1] == [stop] and out[1].finish_reason == "stop"
    assert sizes[0] == 3 and sizes[-1] < 3  # the stopped row no longer runs
    assert out.token_ids == [Generator(model).generate(p, max_new_tokens=8, stop_token_ids=[stop]).token_ids[0]
                             for p in PROMPTS]


# --------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("family", ["dec", "enc"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_scores_are_normalised_sums_of_logprobs(family, length_penalty):
    model = build(family)
    out = Generator(model).generate(PROMPTS[0], max_new_tokens=7, num_beams=4, num_return_sequences=4,
                                    length_penalty=length_penalty, logprobs=True)
    scores = [g.score for g in out]
    assert scores == sorted(scores, reverse=True) and len({tuple(t) for t in out.token_ids}) == 4
    for g in out:
        total = sum(float(full_logits(model, PROMPTS[0], g.token_ids[:i]).log_softmax(-1)[t])
                    for i, t in enumerate(g.token_ids))
        assert math.isclose(g.score, total / len(g.token_ids) ** length_penalty, rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(sum(g.logprobs), total, rel_tol=1e-4, abs_tol=1e-4)


def test_beam_search_beats_or_ties_greedy_on_score():
    model = build("dec", seed=3)
    gen = Generator(model)
    greedy = gen.generate(PROMPTS[2], max_new_tokens=8, logprobs=True)[0]
    beam = gen.generate(PROMPTS[2], max_new_tokens=8, num_beams=6, length_penalty=0.0)[0]
    if greedy.finish_reason == "length":
        assert beam.score >= sum(greedy.logprobs) - 1e-5


# --------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed():
    gen = Generator(build("dec"))
    opts = dict(max_new_tokens=12, do_sample=True, temperature=1.3, num_return_sequences=3)
    a = gen.generate(PROMPTS, seed=7, **opts).token_ids
    assert a == gen.generate(PROMPTS, seed=7, **opts).token_ids
    assert a != gen.generate(PROMPTS, seed=8, **opts).token_ids


def test_top_k_sampling_stays_in_the_top_k():
    model = build("dec")
    out = Generator(model).generate(PROMPTS[0], max_new_tokens=10, do_sample=True, top_k=3, seed=1)[0]
    for i, tok in enumerate(out.token_ids):
        assert tok in full_logits(model, PROMPTS[0], out.token_ids[:i]).topk(3).indices.tolist()


def test_top_k_1_and_temperature_0_are_greedy():
    gen = Generator(build("enc"))
    greedy = gen.generate(PROMPTS[0], max_new_tokens=8).token_ids
    assert gen.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, top_k=1, seed=4).token_ids == greedy
    assert gen.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=0.0).token_ids == greedy


# --------------------------------------------------------------------------- logits rules vs transformers
def test_rules_match_transformers_processors():
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    scores = torch.randn(3, 50) * 3
    history = [[1, 4, 9, 4, 9], [7, 7, 3, 2, 8], [0, 5, 6, 5, 1]]
    ids = torch.tensor(history)
    pairs = [
        (apply_top_k(scores, 5), lp.TopKLogitsWarper(5)(ids, scores.clone())),
        (apply_top_p(scores, 0.7), lp.TopPLogitsWarper(0.7)(ids, scores.clone())),
        (apply_min_p(scores, 0.2), lp.MinPLogitsWarper(0.2)(ids, scores.clone())),
        (apply_repetition_penalty(scores, history, 1.7), lp.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())),
        (apply_no_repeat_ngram(scores, history, 2), lp.NoRepeatNGramLogitsProcessor(2)(ids, scores.clone())),
        (apply_bad_words(scores, history, [[9, 4], [3], [5, 1, 7]]),
         lp.NoBadWordsLogitsProcessor([[9, 4], [3], [5, 1, 7]], eos_token_id=49)(ids, scores.clone())),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs)
        assert not torch.equal(ours, scores)  # every rule changed something here


def test_no_repeat_ngram_and_bad_words_hold_in_generation():
    gen = Generator(build("dec"))
    out = gen.generate(PROMPTS[0], max_new_tokens=30, no_repeat_ngram_size=2, bad_words_ids=[[17], [9, 33]])[0]
    seq = PROMPTS[0] + out.token_ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert 17 not in out.token_ids and (9, 33) not in bigrams


def test_repetition_penalty_changes_the_output():
    gen = Generator(build("dec"))
    plain = gen.generate(PROMPTS[1], max_new_tokens=20).token_ids[0]
    penalised = gen.generate(PROMPTS[1], max_new_tokens=20, repetition_penalty=5.0).token_ids[0]
    assert plain != penalised and len(set(penalised)) >= len(set(plain))


def test_min_new_tokens_holds_back_eos():
    model = build("dec", eos_token_id=7)
    gen = Generator(model)
    free = gen.generate(PROMPTS[0], max_new_tokens=20)[0]
    stop = free.token_ids[2]
    early = gen.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=[stop])[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 3
    late = gen.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=[stop], min_new_tokens=10)[0]
    assert len(late.token_ids) > 10 or late.finish_reason == "length"
    assert all(t not in (stop, 7) for t in late.token_ids[:10])


# --------------------------------------------------------------------------- text, stop strings, streaming
@pytest.fixture(scope="module")
def tokenizer():
    from zenlm import Tokenizer

    text = ["hello world, the cat sat on the mat. 这是一个测试 😀 stop here END of text"] * 20
    return Tokenizer.train(text, vocab_size=300, kind="bpe")


class Scripted(TransformerLM):
    """A real model whose head is overridden to emit a fixed token script (to test text handling)."""

    script: list[int] = []

    def logits(self, hidden):
        step = self.calls
        self.calls += 1
        out = torch.full((hidden.size(0), self.config.vocab_size), -10.0)
        out[:, self.script[min(step, len(self.script) - 1)]] = 10.0
        return out


def scripted(tokenizer, text: str) -> Scripted:
    torch.manual_seed(0)
    model = Scripted(small("dec", vocab_size=tokenizer.vocab_size, max_position_embeddings=128,
                           eos_token_id=tokenizer.eos_id)).eval()
    # byte-level tokens one by one so that multi-byte characters arrive in pieces
    model.script = [tokenizer.token_to_id(b) for b in _byte_tokens(tokenizer, text)] + [tokenizer.eos_id]
    model.calls = 0
    return model


def _byte_tokens(tokenizer, text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [c for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text) for c in piece]


def test_stream_never_splits_multibyte_characters(tokenizer):
    text = "hi 这是一个测试 😀!"
    model = scripted(tokenizer, text)
    deltas = list(Generator(model, tokenizer).stream("hello", max_new_tokens=60))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d and d for d in deltas)
    assert "😀" in deltas  # the 4-byte emoji arrived as four tokens and left as one character
    model.calls = 0
    assert Generator(model, tokenizer).generate("hello", max_new_tokens=60)[0].text == text


def test_stop_string_is_not_returned_nor_streamed(tokenizer):
    text = "the cat sat END of text"
    model = scripted(tokenizer, text)
    gen = Generator(model, tokenizer)
    out = gen.generate("hello", max_new_tokens=60, stop_strings=["END"])[0]
    assert out.text == "the cat sat " and out.finish_reason == "stop"
    assert len(out.token_ids) < len(model.script) - 1  # decoding stopped there
    model.calls = 0
    deltas = list(gen.stream("hello", max_new_tokens=60, stop_strings=["END", "sat on"]))
    assert "".join(deltas) == "the cat sat "
    assert not any("E" in d for d in deltas)


def test_python_convenience_returns_strings_and_ids(tokenizer):
    model = scripted(tokenizer, "the mat")
    assert model.generate("hello", tokenizer=tokenizer, max_new_tokens=20) == "the mat"
    model.calls = 0
    assert generate(model, ["hello", "hi"], tokenizer=tokenizer, max_new_tokens=20) == ["the mat", "the mat"]
    model.calls = 0
    import zenlm

    assert zenlm.generate(model, "hello", tokenizer=tokenizer, max_new_tokens=20) == "the mat"  # the one-call function
    model.calls = 0
    ids = generate(model, [5, 6], max_new_tokens=3)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids) and len(ids) == 3


def test_cli_generate_streams_to_the_terminal(tokenizer, tmp_path, capsys):
    from zenlm.cli import main

    torch.manual_seed(0)
    model = TransformerLM(small("dec", vocab_size=tokenizer.vocab_size, max_position_embeddings=128,
                                eos_token_id=tokenizer.eos_id))
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    expected = Generator(model.eval(), tokenizer).generate("hello world", max_new_tokens=12)[0].text
    assert main(["generate", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", str(tmp_path), "--prompt", "hello world", "--top-p", "1.5", "--temperature", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "top_p must be in (0, 1], got 1.5" in err and len(err.splitlines()) == 1


def test_cli_generate_uses_the_models_own_defaults_unless_told(tokenizer, tmp_path, capsys):
    """A model that carries generation defaults (as an imported generation_config.json does) decodes
    with them from the CLI; a flag given on the command line still wins."""
    from zenlm.cli import main

    torch.manual_seed(1)
    model = TransformerLM(small("dec", vocab_size=tokenizer.vocab_size, max_position_embeddings=128,
                                eos_token_id=tokenizer.eos_id))
    model.config.extra["generation"] = {"num_beams": 3, "max_new_tokens": 7, "no_repeat_ngram_size": 2}
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    generator = Generator(model.eval(), tokenizer)
    own = generator.generate("hello world")[0].text
    plain = generator.generate("hello world", num_beams=1, max_new_tokens=7, no_repeat_ngram_size=0)[0].text
    assert own != plain  # the defaults matter for this model, so the check below can fail
    assert main(["generate", str(tmp_path), "--prompt", "hello world"]) == 0
    assert capsys.readouterr().out == own + "\n"
    assert main(["generate", str(tmp_path), "--prompt", "hello world", "--num-beams", "1",
                 "--no-repeat-ngram-size", "0"]) == 0
    assert capsys.readouterr().out == plain + "\n"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1, got -3"),
    (dict(temperature=-0.5), "temperature must be >= 0 (0 = greedy), got -0.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.2), "top_p must be in (0, 1], got 1.2"),
    (dict(top_k=-1), "top_k must be an integer >= 0, got -1"),
    (dict(num_beams=0), "num_beams must be an integer >= 1, got 0"),
    (dict(stop_strings=[""]), "stop strings must be non-empty strings (length >= 1), got ''"),
    (dict(min_p=2.0), "min_p must be in [0, 1], got 2.0"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences (3) must be <= num_beams (2)"),
    (dict(early_stopping="sometimes"), "early_stopping must be one of True, False, 'never'"),
    (dict(beams=2), "unknown generation option(s) ['beams']"),
])
def test_bad_options_raise_value_error_naming_value_and_range(options, message):
    with pytest.raises(ValueError) as e:
        Generator(build("dec")).generate(PROMPTS[0], **options)
    assert message in str(e.value)


def test_bad_prompts_raise_value_error(tokenizer):
    gen = Generator(build("dec"), tokenizer)
    with pytest.raises(ValueError, match=r"prompt is empty \(0 characters\)"):
        gen.generate("")
    with pytest.raises(ValueError, match=r"prompt is empty \(0 tokens"):
        gen.generate([])
    with pytest.raises(ValueError, match=r"token id 61, outside \[0, vocab_size=61\)"):
        gen.generate([3, 61])
    with pytest.raises(ValueError, match="encoder-only model cannot generate"):
        Generator(build("enc", num_decoder_layers=0))


@pytest.mark.parametrize("family", ["dec", "enc"])
def test_prompt_longer_than_the_context_window(family):
    gen = Generator(build(family))
    long = list(range(3, 53))  # 50 tokens, window 48
    with pytest.raises(ValueError) as e:
        gen.generate(long, max_new_tokens=4)
    msg = str(e.value)
    assert "is 50 tokens" in msg and "context window of 48" in msg and "truncate=True" in msg
    out = gen.generate(long, max_new_tokens=4, truncate=True)
    cut = long[-44:] if family == "dec" else long[:48]
    assert out.token_ids == gen.generate(cut, max_new_tokens=4).token_ids and out[0].prompt_tokens == len(cut)


# --------------------------------------------------------------------------- the oneDNN decoding path
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_cpu_decoding_matches_default_path_and_restores_the_setting(family):
    """fast_cpu (default) sends linear layers through oneDNN while decoding: same tokens as torch's
    default path (greedy and beams), log-probs equal to float rounding, and the caller's global
    ``zenlm.fast_cpu`` setting is what it was afterwards."""
    from zenlm.kernels import _FAST_CPU, fast_cpu

    before = _FAST_CPU["enabled"]
    gen = Generator(build(family))
    for options in (dict(), dict(num_beams=3, num_return_sequences=2)):
        fast = gen.generate(PROMPTS, max_new_tokens=10, logprobs=True, **options)
        slow = gen.generate(PROMPTS, max_new_tokens=10, logprobs=True, fast_cpu=False, **options)
        assert fast.token_ids == slow.token_ids
        if not options:
            for a, b in zip(fast, slow):
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert _FAST_CPU["enabled"] is before
    try:
        on = fast_cpu(True)  # False where torch has no oneDNN
        gen.generate(PROMPTS[0], max_new_tokens=3, fast_cpu=False)
        gen.generate(PROMPTS[0], max_new_tokens=3)
        assert _FAST_CPU["enabled"] is on
    finally:
        fast_cpu(before)


def test_seq2seq_rows_sharing_a_source_stay_right_when_rows_leave_one_by_one():
    """Beams/samples of one prompt share its cross-attention keys/values; when sampled rows finish at
    different steps the shared source is split per row. Every token must still come from the model's
    true distribution: each sampled token is in the full forward pass's top 3."""
    model = build("enc")
    stops = list(range(30, 45))  # many stop ids: rows end at different steps
    out = Generator(model).generate(PROMPTS, max_new_tokens=10, do_sample=True, top_k=3, seed=3,
                                    num_return_sequences=3, stop_token_ids=stops)
    assert len(out) == 9 and len({len(g.token_ids) for g in out}) > 1
    for i, g in enumerate(out):
        prompt = PROMPTS[i // 3]
        for j, tok in enumerate(g.token_ids):
            assert tok in full_logits(model, prompt, g.token_ids[:j]).topk(3).indices.tolist()


def test_cross_attention_folds_a_groups_queries_onto_one_source():
    from zenlm.model import KVCache

    model = build("enc")
    memory = model.encode(torch.tensor([PROMPTS[0], PROMPTS[2][:5] + [1]]))[0]
    tokens = torch.tensor([[3], [4], [5], [6]])  # rows 0-1 read source 0, rows 2-3 source 1
    with torch.no_grad():
        shared = model.decode(tokens, memory, cache=KVCache(4))[0]
        copied = model.decode(tokens, memory.repeat_interleave(2, 0), cache=KVCache(4))[0]
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-5)
