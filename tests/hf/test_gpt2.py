"""GPT-2 from a Hugging Face folder: Conv1D weights transposed, fused c_attn kept as our q|k|v."""
import pytest
import torch

import zenlm
from hf_helpers import assert_close_where, assert_same_token_ids, bpe, greedy, hf_greedy, save_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    tok = bpe(["<|endoftext|>"])
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=0, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = save_hf(model, tmp_path_factory.mktemp("gpt2"), tok, bos_token="<|endoftext|>",
                     eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return model, folder


def test_gpt2_hidden_states_and_logits_match_transformers(gpt2):
    hf, folder = gpt2
    ours = zenlm.load(folder)
    batch = assert_same_token_ids(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask)
    assert_close_where(out.last_hidden_state, ref.hidden_states[-1], mask)
    assert_close_where(out.logits, ref.logits, mask)


def test_gpt2_backbone_loads_from_hf(gpt2):
    hf, folder = gpt2
    backbone = zenlm.TransformerModel.from_hf(folder)
    assert not isinstance(backbone, zenlm.TransformerLM)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert_close_where(backbone(ids).last_hidden_state, hf.transformer(ids).last_hidden_state,
                           torch.ones_like(ids))


def test_gpt2_greedy_decoding_matches_generate(gpt2):
    hf, folder = gpt2
    ours = zenlm.load(folder)
    prompt = zenlm.load_tokenizer(folder).encode_batch(["The quick brown fox"])["input_ids"]
    expected = hf_greedy(hf, prompt, 20)
    assert len(expected) >= 5
    assert greedy(ours, prompt, 20) == expected
    assert ours.generate(prompt[0].tolist(), max_new_tokens=20) == expected  # zenlm.generate's engine
