"""M2M100 / NLLB-200 (one architecture, ``model_type`` m2m_100) from Hugging Face folders: pre-norm encoder-decoder
with a final layer norm per stack, embeddings scaled by sqrt(d_model), fairseq's sinusoidal positions (frequencies
1 … 1/10000 with both ends, angles from pad_token_id + 1, counted over non-pad tokens only, a pad getting none).
Two shapes: the M2M100/NLLB defaults (pad 1, ReLU, scaled embeddings) and one with another pad id, GELU, unscaled.
Encoder and decoder states and logits on padded batches (a left-padded source keeps its unpadded states), cached
decoding against the full forward, greedy and beam-4 against transformers' generate(), the target-language token
forced from generation_config.json, export back to transformers."""
import pytest
import torch

import zenlm
from family_checks import ATOL, OFF
from zenlm.generation import Generator
from zenlm.model import sinusoidal_table

transformers = pytest.importorskip("transformers")

NEW = 24
VOCAB = 128
PROMPTS = [[5, 17, 33, 8, 91, 40, 12, 77, 3, 9, 60, 61, 19, 2], [64, 9, 21, 2], [100, 3, 55, 56, 57, 23, 7, 44, 2]]
SHAPES = {"m2m100": dict(pad_token_id=1, activation_function="relu", scale_embedding=True),
          "pad3-gelu-unscaled": dict(pad_token_id=3, activation_function="gelu", scale_embedding=False)}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.M2M100Config(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                       decoder_ffn_dim=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
                                       decoder_start_token_id=2, **SHAPES[request.param])
    hf = transformers.M2M100ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random model's logits barely move from the input token: louder sublayers
        for name, p in hf.named_parameters():
            if name.endswith(("fc2.weight", "out_proj.weight")):
                p.mul_(4.0)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = zenlm.load(folder)
    c, pad = ours.config, config.pad_token_id
    assert (c.position, c.sinusoid_endpoint, c.positions_skip_pad, c.position_offset) == ("sinusoidal", True, True,
                                                                                          pad + 1)
    assert (c.pre_norm, c.final_norm, c.scale_embedding, c.tie_word_embeddings, c.lm_head_bias) == (
        True, True, config.scale_embedding, True, False)
    assert c.activation == config.activation_function and c.pad_token_id == pad
    return hf, ours, folder


def _batch(lengths, seed, pad, left=False):
    """Random ids (none equal to pad) padded to the longest, on the left or the right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        where = slice(max(lengths) - n, None) if left else slice(0, n)
        ids[i, where] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[i, where] = 1
    return ids, mask


def _close(actual, expected, mask):
    mask = mask.bool()
    assert expected[mask].std() > 1e-2, "reference outputs are (near) constant: the comparison would prove nothing"
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=1e-4)


def test_fairseq_sinusoids_equal_transformers_table():
    """Rows from the pad id + 1 on, with the pad's own row zero in transformers (zenlm gives a pad no row)."""
    for dim, pad in ((64, 1), (30, 3)):
        ref = transformers.models.m2m_100.modeling_m2m_100.M2M100SinusoidalPositionalEmbedding.get_embedding(
            50 + pad + 1, dim, pad)
        torch.testing.assert_close(sinusoidal_table(50, dim, endpoint=True, start=pad + 1), ref[pad + 1:])
    assert not torch.allclose(sinusoidal_table(50, 64, endpoint=True), sinusoidal_table(50, 64))  # not Marian's


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_m2m100_states_and_logits_match_transformers(pair, left):
    hf, ours, _ = pair
    pad = hf.config.pad_token_id
    src, src_mask = _batch((30, 19, 25), 1, pad, left)
    tgt, tgt_mask = _batch((20, 12, 16), 2, pad)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask,
                 output_hidden_states=True)
        out = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
        alone = ours(src[1:2][src_mask[1:2].bool()][None], tgt[1:2, :12])  # the second pair without padding
    _close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, src_mask)
    _close(out.last_hidden_state, ref.decoder_hidden_states[-1], tgt_mask)
    _close(out.logits, ref.logits, tgt_mask)
    # positions count real tokens only: padding (either side) leaves a sentence's states as they are alone
    torch.testing.assert_close(out.encoder_last_hidden_state[1][src_mask[1].bool()], alone.encoder_last_hidden_state[0],
                               atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, :12], alone.logits[0], atol=ATOL, rtol=1e-4)


def _stepped(model, src, src_mask, tgt, hf: bool = False) -> torch.Tensor:
    """Logits of ``tgt`` decoded through the cache: five tokens, then one at a time."""
    first = dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt[:, :5], use_cache=True)
    out = model(**first) if hf else model(src, tgt[:, :5], attention_mask=src_mask, use_cache=True)
    steps = [out.logits]
    for t in range(5, tgt.size(1)):
        if hf:
            out = model(decoder_input_ids=tgt[:, t:t + 1], attention_mask=src_mask, cache=out.cache, use_cache=True,
                        encoder_outputs=(out.encoder_last_hidden_state,))
        else:
            out = model(decoder_input_ids=tgt[:, t:t + 1], attention_mask=src_mask, past_key_values=out.past_key_values,
                        use_cache=True, encoder_hidden_states=out.encoder_last_hidden_state)
        steps.append(out.logits)
    return torch.cat(steps, 1)


@torch.no_grad()
def test_m2m100_cached_decoding_equals_the_full_forward(pair):
    hf, ours, _ = pair
    pad = hf.config.pad_token_id
    src, src_mask = _batch((30, 19), 3, pad, left=True)
    tgt = torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    full = ours(src, tgt, attention_mask=src_mask).logits
    torch.testing.assert_close(_stepped(ours, src, src_mask, tgt), full, atol=ATOL, rtol=1e-4)
    # a pad token the decoder is given mid-sentence has no position; the full forward then counts one token less
    # after it, while a cache counts every cached token (transformers' make_positions with cache_length, as here)
    tgt[1, 9] = pad
    stepped = _stepped(ours, src, src_mask, tgt)
    torch.testing.assert_close(stepped, _stepped(hf, src, src_mask, tgt, hf=True), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(ours(src, tgt, attention_mask=src_mask).logits,
                               hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits,
                               atol=ATOL, rtol=1e-4)
    assert not torch.allclose(stepped[1, 10:], ours(src, tgt, attention_mask=src_mask).logits[1, 10:], atol=1e-3)


def _hf_generate(hf, prompts, **options) -> list[list[int]]:
    """transformers' generate() on a right-padded batch; new tokens after the start token, through the first end."""
    pad, eos = hf.config.pad_token_id, hf.config.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    settings = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=0, no_repeat_ngram_size=0, repetition_penalty=1.0,
                    bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_eos_token_id=None,
                    eos_token_id=eos, pad_token_id=pad)
    settings.update(options)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, **settings)
    return [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in out[:, 1:].tolist()]


def test_m2m100_greedy_and_beam_search_match_generate(pair):
    hf, ours, _ = pair
    greedy = _hf_generate(hf, PROMPTS, forced_bos_token_id=None)
    assert len({t for row in greedy for t in row}) > 3, "degenerate reference"
    assert Generator(ours).generate(PROMPTS, max_new_tokens=NEW, **OFF).token_ids == greedy
    beams = dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False)
    assert Generator(ours).generate(PROMPTS, max_new_tokens=NEW, **beams, **OFF).token_ids == _hf_generate(
        hf, PROMPTS, forced_bos_token_id=None, **beams)


def test_the_target_language_token_is_forced_from_generation_config(pair, tmp_path):
    """NLLB/M2M100 start the translation with the target language's token (forced_bos_token_id); a folder whose
    generation_config.json names one decodes with it by default, and keeps it on export."""
    hf, _, folder = pair
    language = 77
    hf.generation_config.forced_bos_token_id = language
    hf.generation_config.save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    ours = zenlm.load(tmp_path)
    assert ours.config.extra["generation"]["forced_bos_token_id"] == language
    expected = _hf_generate(hf, PROMPTS)  # its generation_config forces the language
    assert all(row[0] == language for row in expected)
    assert expected != _hf_generate(hf, PROMPTS, forced_bos_token_id=None)
    assert Generator(ours).generate(PROMPTS, max_new_tokens=NEW, forced_eos_token_id=None).token_ids == expected
    zenlm.hf.save_hf(ours, tmp_path / "back")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").forced_bos_token_id == language


def test_m2m100_export_loads_in_transformers_with_equal_logits(pair, tmp_path):
    hf, ours, _ = pair
    zenlm.hf.save_hf(ours, tmp_path)
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf) and back.config.model_type == "m2m_100"
    pad = hf.config.pad_token_id
    src, src_mask = _batch((33, 21), 5, pad, left=True)
    tgt, tgt_mask = _batch((25, 18), 6, pad)
    with torch.no_grad():
        args = dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        _close(back(**args).logits, hf(**args).logits, tgt_mask)


# facebook/nllb-200-distilled-600M's config.json (NLLB-200 is M2M100's architecture, model_type m2m_100)
NLLB_200 = {"activation_dropout": 0.0, "activation_function": "relu", "architectures": ["M2M100ForConditionalGeneration"],
            "attention_dropout": 0.1, "bos_token_id": 0, "d_model": 1024, "decoder_attention_heads": 16,
            "decoder_ffn_dim": 4096, "decoder_layerdrop": 0, "decoder_layers": 12, "decoder_start_token_id": 2,
            "dropout": 0.1, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "encoder_layerdrop": 0,
            "encoder_layers": 12, "eos_token_id": 2, "init_std": 0.02, "is_encoder_decoder": True, "max_length": 200,
            "max_position_embeddings": 1024, "model_type": "m2m_100", "num_hidden_layers": 12, "pad_token_id": 1,
            "scale_embedding": True, "tokenizer_class": "NllbTokenizer", "torch_dtype": "float32", "use_cache": True,
            "vocab_size": 256206}


def test_the_nllb_200_config_reads_as_transformers_builds_it():
    """The full-size shape (built on the meta device, no memory): transformers' parameter count, 615,073,792."""
    c = zenlm.hf.config_from_hf(NLLB_200)
    with torch.device("meta"):
        hf = transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(**NLLB_200))
    assert c.num_parameters() == hf.num_parameters() == 615_073_792
    assert (c.num_encoder_layers, c.num_decoder_layers, c.hidden_size, c.position_offset, c.start_token_id) == (
        12, 12, 1024, 2, 2)
    assert c.extra["generation"] == {"max_new_tokens": 199}  # max_length 200 counts the start token


def test_settings_zenlm_cannot_honour_are_refused_by_name():
    base = dict(model_type="m2m_100", d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="encoder_attention_heads=4 differs from decoder_attention_heads=8"):
        zenlm.hf.config_from_hf({**base, "decoder_attention_heads": 8})
    with pytest.raises(ValueError, match="m2m_100: pad_token_id=None"):
        zenlm.hf.config_from_hf({**base, "pad_token_id": None})
    with pytest.raises(ValueError, match="m2m_100: tie_word_embeddings=False is not supported"):
        zenlm.hf.config_from_hf({**base, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="activation 'quick_gelu' is not supported"):
        zenlm.hf.config_from_hf({**base, "activation_function": "quick_gelu"})
    with pytest.raises(ValueError, match="positions_skip_pad needs position='sinusoidal', got position='rotary'"):
        zenlm.TransformerConfig(position="rotary", positions_skip_pad=True)
