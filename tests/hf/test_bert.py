"""BERT from a Hugging Face folder: post-LN encoder, token types, and the MLM head
(cls.predictions.* -> mlm_dense / mlm_norm / lm_head_bias, decoder tied to the embeddings)."""
import shutil

import pytest
import torch

import zenlm
from hf_helpers import assert_close_where, assert_same_token_ids, minilm_dir

transformers = pytest.importorskip("transformers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, hidden_act="gelu")
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # a fresh MLM bias is all zeros; make it count
        model.cls.predictions.bias.normal_()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:  # the real uncased WordPiece tokenizer of MiniLM
        shutil.copy(minilm_dir() / name, folder / name)
    return model, folder


def test_bert_hidden_states_and_mlm_logits_match_transformers(bert):
    hf, folder = bert
    ours = zenlm.load(folder)
    assert ours.config.mlm_transform and ours.config.lm_head_bias and not ours.config.pre_norm
    batch = assert_same_token_ids(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = (torch.arange(ids.size(1)) >= 3).long().expand_as(ids).contiguous()  # a second segment
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
    assert_close_where(out.last_hidden_state, ref.hidden_states[-1], mask)
    assert_close_where(out.logits, ref.logits, mask)


def test_bert_backbone_without_prefix_or_head_loads(bert, tmp_path):
    """A bare BertModel folder (tensor names without 'bert.', no cls.*), as MiniLM ships."""
    hf, _ = bert
    hf.bert.save_pretrained(tmp_path)
    ours = zenlm.load(tmp_path)
    assert not ours.config.mlm_transform
    ids = torch.randint(0, 30522, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close_where(ours(ids, attention_mask=mask).last_hidden_state, ref, mask)


def test_bert_pooler_comes_along_and_goes_back(bert, tmp_path):
    """BertModel's pooler (tanh(dense(h[CLS]))) is kept on import, gives transformers'
    pooler_output, and is written back by HF -> zenlm -> HF."""
    from transformers import AutoModel

    from zenlm.hf import convert_from_hf, convert_to_hf, pooler_output

    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=48)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = zenlm.load(tmp_path / "hf")
    ids = torch.randint(0, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).pooler_output
        got = pooler_output(ours, ours(ids, attention_mask=mask).last_hidden_state)
    assert ref.std() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    convert_from_hf(tmp_path / "hf", tmp_path / "zenlm")
    convert_to_hf(tmp_path / "zenlm", tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(again.pooler.dense.weight, hf.pooler.dense.weight)
    assert torch.equal(again.pooler.dense.bias, hf.pooler.dense.bias)
    with pytest.raises(ValueError, match="this model has no pooler"):  # BertForMaskedLM has none
        pooler_output(zenlm.load(bert[1]), torch.zeros(1, 3, 64))
