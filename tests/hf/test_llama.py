"""Llama from a Hugging Face folder: RoPE, RMSNorm, SwiGLU (gate|up fused into mlp.fc_in),
grouped-query attention (q|k|v fused with fewer K/V heads) and an untied output head."""
import pytest
import torch

import zenlm
from hf_helpers import assert_close_where, assert_same_token_ids, bpe, greedy, hf_greedy, save_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    tok = bpe(["<unk>", "<s>", "</s>"], template="<s> $A")
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = transformers.LlamaForCausalLM(config).eval()
    folder = save_hf(model, tmp_path_factory.mktemp("llama"), tok, bos_token="<s>", eos_token="</s>",
                     unk_token="<unk>", pad_token="</s>")
    return model, folder


def test_llama_hidden_states_and_logits_match_transformers(llama):
    hf, folder = llama
    ours = zenlm.load(folder)
    assert ours.config.num_key_value_heads == 2 and ours.config.rope_theta == 500.0
    assert not ours.config.tie_word_embeddings
    batch = assert_same_token_ids(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask)
    assert_close_where(out.last_hidden_state, ref.hidden_states[-1], mask)
    assert_close_where(out.logits, ref.logits, mask)


def test_llama_greedy_decoding_matches_generate(llama):
    hf, folder = llama
    ours = zenlm.load(folder)
    prompt = zenlm.load_tokenizer(folder).encode_batch(["A journey of"], add_special_tokens=True)["input_ids"]
    expected = hf_greedy(hf, prompt, 20)
    assert len(expected) >= 5
    assert greedy(ours, prompt, 20) == expected
    assert ours.generate(prompt[0].tolist(), max_new_tokens=20) == expected  # zenlm.generate's engine
