"""benchmarks/bench_quantize.py --llamacpp: zenlm's side of the comparison follows llama-perplexity's
protocol (tools/perplexity/perplexity.cpp, ``perplexity()``). Checked against a hand computation that
walks the C++ loop's indices one token at a time; llama.cpp itself is not needed."""
import math
import sys
from pathlib import Path

import pytest
import torch

import zenlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_quantize import llamacpp_protocol_perplexity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = zenlm.TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_encoder_layers=0, num_decoder_layers=2, max_position_embeddings=16,
                                     position="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    return zenlm.TransformerLM(config).eval()


def by_hand(model, ids, n_ctx, bos):
    """perplexity.cpp's loop, literally: tokens = tokenize(text, add_special) (BOS first when added);
    n_chunk = size / n_ctx; per chunk, tokens[start] swapped for BOS, all n_ctx evaluated, and for
    k in [first, n_ctx - 1): nll += log-sum-exp(logits[k]) - logits[k][tokens[start + k + 1]]."""
    tokens = ([bos] if bos is not None else []) + list(ids)
    n_chunk, first = len(tokens) // n_ctx, n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunk):
        start = i * n_ctx
        chunk = tokens[start:start + n_ctx]
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        for k in range(first, n_ctx - 1):
            row = logits[k].tolist()
            top = max(row)
            nll += top + math.log(sum(math.exp(x - top) for x in row)) - row[tokens[start + k + 1]]
            count += 1
    return math.exp(nll / count), n_chunk, count


@pytest.mark.parametrize("bos", [None, 1])
@pytest.mark.parametrize("n_ctx", [16, 9])  # the model's context; an odd one (first = 4, 4 scored per chunk)
def test_protocol_perplexity_matches_llama_perplexity_loop_by_hand(model, bos, n_ctx):
    ids = torch.randint(5, 40, (83,), generator=torch.Generator().manual_seed(1)).tolist()  # tail dropped
    ppl, chunks, count = llamacpp_protocol_perplexity(model, ids, n_ctx, bos)
    want_ppl, want_chunks, want_count = by_hand(model, ids, n_ctx, bos)
    assert (chunks, count) == (want_chunks, want_count) == ((83 + (bos is not None)) // n_ctx,
                                                            chunks * (n_ctx - 1 - n_ctx // 2))
    assert ppl == pytest.approx(want_ppl, rel=1e-5)


def test_bos_replaces_each_chunks_first_token_and_shifts_the_chunks(model):
    """With BOS the chunks start one token earlier in the text (the BOS from tokenization takes a place)
    and every chunk's first token is BOS: the score differs from the no-BOS one."""
    ids = torch.randint(5, 40, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    with_bos, chunks_bos, _ = llamacpp_protocol_perplexity(model, ids, 16, 1)
    without, chunks, _ = llamacpp_protocol_perplexity(model, ids, 16, None)
    assert (chunks_bos, chunks) == (4, 4)
    assert with_bos != pytest.approx(without, rel=1e-6)


def test_too_short_a_text_is_refused_as_llama_perplexity_does(model):
    with pytest.raises(ValueError, match="2 \\* n_ctx = 32"):
        llamacpp_protocol_perplexity(model, list(range(5, 35)), 16, 1)
