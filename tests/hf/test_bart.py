"""BART from a Hugging Face folder: post-LN encoder-decoder, learned positions offset by 2,
embedding layer norms, fused q|k|v and cross k|v, final_logits_bias -> lm_head_bias."""
import pytest
import torch

import zenlm
from hf_helpers import assert_close_where, assert_same_token_ids, bpe, greedy, hf_greedy, save_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    torch.manual_seed(0)
    tok = bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], template="<s> $A </s>")
    config = transformers.BartConfig(vocab_size=tok.get_vocab_size(), d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                     decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # a fresh final_logits_bias is all zeros; make it count
        model.final_logits_bias.normal_()
    folder = save_hf(model, tmp_path_factory.mktemp("bart"), tok, bos_token="<s>", eos_token="</s>",
                     pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    return model, folder


def test_bart_hidden_states_and_logits_match_transformers(bart):
    hf, folder = bart
    ours = zenlm.load(folder)
    assert ours.config.position_offset == 2 and ours.config.embedding_norm and ours.config.lm_head_bias
    source = assert_same_token_ids(folder)
    target = zenlm.load_tokenizer(folder).encode_batch(["Das ist gut.", "Noch ein Satz, etwas länger.", "x",
                                                        "Hallo", "eins zwei drei"], add_special_tokens=True)
    args = dict(input_ids=source["input_ids"], attention_mask=source["attention_mask"],
                decoder_input_ids=target["input_ids"], decoder_attention_mask=target["attention_mask"])
    with torch.no_grad():
        ref = hf(**args)
        dec = hf.model(**args)
        out = ours(args.pop("input_ids"), args.pop("decoder_input_ids"), **args)
    assert_close_where(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, source["attention_mask"])
    assert_close_where(out.last_hidden_state, dec.last_hidden_state, target["attention_mask"])
    assert_close_where(out.logits, ref.logits, target["attention_mask"])


def test_bart_greedy_decoding_matches_generate(bart):
    hf, folder = bart
    ours = zenlm.load(folder)
    source = zenlm.load_tokenizer(folder).encode_batch(["The quick brown fox"], add_special_tokens=True)["input_ids"]
    expected = hf_greedy(hf, source, 20)
    assert len(expected) >= 5
    assert greedy(ours, source, 20) == expected
    assert ours.generate(source[0].tolist(), max_new_tokens=20, forced_eos_token_id=None) == expected
