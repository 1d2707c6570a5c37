"""Out and back: a zenlm model written with `zenlm convert to-hf` loads in transformers with the
same outputs and no missing or unexpected tensors, and comes back bit-exact through
`zenlm convert from-hf`; an HF folder going through zenlm and back keeps every tensor bit-exact."""
import pytest
import torch
from safetensors.torch import load_file

import zenlm
from zenlm import TransformerConfig, TransformerLM, Tokenizer
from zenlm.cli import main
from zenlm.hf import convert_from_hf, convert_to_hf
from hf_helpers import CORPUS, assert_close_where, assert_same_token_ids

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64)
NATIVE = {  # zenlm configs that are exactly one HF family each
    "bert": ("AutoModelForMaskedLM", dict(
        SMALL, num_encoder_layers=2, num_decoder_layers=0, pre_norm=False, norm_eps=1e-12, type_vocab_size=2,
        embedding_norm=True, final_norm=False, mlm_transform=True, lm_head_bias=True)),
    "gpt2": ("AutoModelForCausalLM", dict(SMALL, num_encoder_layers=0, num_decoder_layers=2, activation="gelu_tanh")),
    "bart": ("AutoModelForSeq2SeqLM", dict(
        SMALL, num_encoder_layers=2, num_decoder_layers=2, pre_norm=False, position_offset=2, embedding_norm=True,
        final_norm=False, lm_head_bias=True)),
    "marian": ("AutoModelForSeq2SeqLM", dict(
        SMALL, num_encoder_layers=2, num_decoder_layers=2, pre_norm=False, position="sinusoidal", scale_embedding=True,
        activation="silu", final_norm=False, lm_head_bias=True, decoder_start_token_id=0)),
    "llama": ("AutoModelForCausalLM", dict(
        SMALL, num_encoder_layers=0, num_decoder_layers=2, num_key_value_heads=2, norm="rmsnorm", norm_eps=1e-6,
        activation="swiglu", position="rotary", rope_theta=1000.0, bias=False, tie_word_embeddings=False)),
    "llama-tied": ("AutoModelForCausalLM", "tiny"),  # the `tiny` preset is a Llama with tied embeddings
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=320)


def native_model(name: str, vocab_size: int) -> TransformerLM:
    torch.manual_seed(0)
    spec = NATIVE[name][1]
    config = (TransformerConfig.from_preset(spec, vocab_size=vocab_size, max_position_embeddings=64)
              if isinstance(spec, str) else TransformerConfig(vocab_size=vocab_size, **spec))
    model = TransformerLM(config).eval()
    with torch.no_grad():  # fresh norms are exactly 1 and biases 0: perturb everything so every tensor counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", list(NATIVE))
def test_zenlm_to_hf_matches_transformers_and_comes_back_bit_exact(name, tokenizer, tmp_path):
    model = native_model(name, tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "zenlm", tokenizer)
    assert main(["convert", "to-hf", str(tmp_path / "zenlm"), str(tmp_path / "hf")]) == 0

    auto = getattr(transformers, NATIVE[name][0])
    hf, info = auto.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert hf.config.model_type == name.split("-")[0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = assert_same_token_ids(tmp_path / "hf")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            ref = hf.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=mask)
            out = model(ids, ids, attention_mask=mask, decoder_attention_mask=mask)
        else:
            ref = hf.eval()(input_ids=ids, attention_mask=mask)
            out = model(ids, attention_mask=mask)
    assert_close_where(out.logits, ref.logits, mask)

    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = zenlm.load(tmp_path / "back")
    assert {**back.config.to_dict(), "extra": {}} == {**model.config.to_dict(), "extra": {}}
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert zenlm.load_tokenizer(tmp_path / "back").encode("fox 🙂 这是") == tokenizer.encode("fox 🙂 这是")


HF_MODELS = {
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=120, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48)),
    "marian": lambda: transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=119,
        decoder_start_token_id=119)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=48)),
    "llama-bias": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_through_zenlm_and_back_keeps_every_tensor(name, tmp_path):
    """Also covers settings the family tests leave out: Llama with biases and tied embeddings, one K/V head."""
    torch.manual_seed(0)
    hf = HF_MODELS[name]().eval()
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "zenlm")
    ids = torch.randint(3, 110, (2, 9))
    ours = zenlm.load(tmp_path / "zenlm")
    seq2seq = ours.config.is_encoder_decoder
    with torch.no_grad():  # the imported model computes what the original does
        ref = hf(input_ids=ids, decoder_input_ids=ids) if seq2seq else hf(input_ids=ids)
        assert_close_where(ours(ids, ids if seq2seq else None).logits, ref.logits, torch.ones_like(ids))
    convert_to_hf(tmp_path / "zenlm", tmp_path / "again")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_a_config_no_family_fits_is_refused_with_the_reason(tmp_path):
    model = TransformerLM(TransformerConfig.from_preset("seed-base", num_encoder_layers=1, num_decoder_layers=1,
                                                        hidden_size=64, intermediate_size=96))
    model.save_pretrained(tmp_path / "zenlm")
    with pytest.raises(ValueError, match="matches no Hugging Face family") as err:
        convert_to_hf(tmp_path / "zenlm", tmp_path / "hf")
    assert "bart: pre_norm=True (a bart model has False)" in str(err.value) and "llama: num_encoder_layers=1" in str(err.value)
