"""T5 (v1.0) and T5 v1.1 / Flan-T5 from Hugging Face folders: relative position buckets (bidirectional in the encoder,
causal in the decoder; sequences past ``relative_attention_max_distance`` so the logarithmic buckets
count), unscaled attention scores, RMSNorm without bias, one shared embedding; the original ReLU MLP and tied
head scaled by d_model^-0.5, and Flan-T5's gated-GELU MLP and own untied head. Encoder and decoder states and logits on
padded batches, cached decoding against the full forward, greedy and beam-4 against transformers'
generate(), export back to transformers."""
import pytest
import torch

import zenlm
from family_checks import ATOL, OFF
from zenlm.generation import Generator

transformers = pytest.importorskip("transformers")

NEW = 24
# sources of different lengths (right-padded), the longest past the max distance (20)
PROMPTS = [[5, 17, 33, 8, 91, 40, 12, 77, 3, 9, 60, 61, 19, 4, 88, 45, 23, 31, 70, 71, 72, 14, 15, 99, 98],
           [64, 9, 21], [100, 3, 55, 56, 57, 23, 7, 44, 2, 11]]


def _t5(tied: bool, decoder_layers: int = 2, mlp: str = "gated-gelu"):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=24, d_ff=96, num_layers=2,
                                   num_decoder_layers=decoder_layers, num_heads=4, feed_forward_proj=mlp,
                                   tie_word_embeddings=tied, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1, initializer_factor=1.0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["t5-v1.0", "flan-t5"])
def pair(request, tmp_path_factory):
    """T5 v1.0: a ReLU MLP (one ``wi``) and the tied head scaled by d_model^-0.5; Flan-T5: gated GELU, own head."""
    tied = request.param == "t5-v1.0"
    hf = _t5(tied, mlp="relu" if tied else "gated-gelu")
    with torch.no_grad():
        if not tied:  # Flan-T5 keeps its own output matrix
            hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.5)
        else:  # a tied head of a random model sees mostly the input token's own embedding: louder sublayers
            for name, p in hf.named_parameters():
                if name.startswith("decoder.") and name.endswith(("wo.weight", ".o.weight")):
                    p.mul_(8.0)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = zenlm.load(folder)
    c = ours.config
    assert (c.position, c.query_pre_attn_scalar, c.relative_buckets, c.relative_max_distance, c.head_dim) == (
        "relative", 1.0, 8, 20, 24)
    assert (c.num_encoder_layers, c.num_decoder_layers, c.activation) == (2, 2, "relu" if tied else "geglu_tanh")
    assert c.tie_word_embeddings == tied and c.logit_scale == (64 ** -0.5 if tied else 1.0)
    return hf, ours, folder


def _batch(lengths, seed, right=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 128, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _close(actual, expected, mask):
    mask = mask.bool()
    assert expected[mask].std() > 1e-2
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=1e-4)


def test_t5_states_and_logits_match_transformers(pair):
    hf, ours, _ = pair
    src, src_mask = _batch((40, 29, 35), 1)
    tgt, tgt_mask = _batch((30, 22, 26), 2)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask,
                 output_hidden_states=True)
        out = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
    _close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, src_mask)
    _close(out.last_hidden_state, ref.decoder_hidden_states[-1], tgt_mask)
    _close(out.logits, ref.logits, tgt_mask)


def test_t5_with_more_decoder_than_encoder_layers(tmp_path):
    """(transformers' generate() cannot run this shape; the forward can)"""
    hf = _t5(False, decoder_layers=3)
    hf.save_pretrained(tmp_path)
    ours = zenlm.load(tmp_path)
    assert (ours.config.num_encoder_layers, ours.config.num_decoder_layers) == (2, 3)
    src, src_mask = _batch((30, 12), 7)
    tgt, tgt_mask = _batch((20, 9), 8)
    with torch.no_grad():
        _close(ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask).logits,
               hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                  decoder_attention_mask=tgt_mask).logits, tgt_mask)


def test_t5_cached_decoding_equals_the_full_forward(pair):
    _, ours, _ = pair
    src, src_mask = _batch((40, 29), 3)
    tgt = torch.randint(2, 128, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(src, tgt, attention_mask=src_mask).logits
        out = ours(src, tgt[:, :5], attention_mask=src_mask, use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(5, tgt.size(1)):
            out = ours(decoder_input_ids=tgt[:, t:t + 1], attention_mask=src_mask, past_key_values=cache,
                       use_cache=True, encoder_hidden_states=out.encoder_last_hidden_state)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=1e-4)


def _hf_generate(hf, prompts, **options) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=0,
                          no_repeat_ngram_size=0, repetition_penalty=1.0, bad_words_ids=None, suppress_tokens=None,
                          begin_suppress_tokens=None, eos_token_id=1, pad_token_id=0, **options)
    return [seq[:seq.index(1) + 1] if 1 in seq else seq for seq in out[:, 1:].tolist()]


def test_t5_greedy_and_beam_search_match_generate(pair):
    hf, ours, _ = pair
    greedy = _hf_generate(hf, PROMPTS)
    assert len({t for row in greedy for t in row}) > 3, "degenerate reference"
    assert Generator(ours).generate(PROMPTS, max_new_tokens=NEW, **OFF).token_ids == greedy
    beams = dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False)
    assert Generator(ours).generate(PROMPTS, max_new_tokens=NEW, **beams, **OFF).token_ids == _hf_generate(
        hf, PROMPTS, **beams)


def test_t5_export_loads_in_transformers_with_equal_logits(pair, tmp_path):
    hf, ours, _ = pair
    zenlm.hf.save_hf(ours, tmp_path)
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    src, src_mask = _batch((33, 21), 5)
    tgt, tgt_mask = _batch((25, 18), 6)
    with torch.no_grad():
        args = dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        _close(back(**args).logits, hf(**args).logits, tgt_mask)


def test_an_mlp_zenlm_lacks_is_refused_by_name():
    h = dict(model_type="t5", d_model=64, num_heads=4, d_kv=16, num_layers=2, vocab_size=128, feed_forward_proj="gated-relu")
    with pytest.raises(ValueError, match="feed_forward_proj=.gated-relu. is not supported; supported: relu, gelu"):
        zenlm.hf.config_from_hf(h)
