"""Checkpoints: bit-exact round trip, clear errors on damaged files, no pickle."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zenlm
from zenlm import TransformerConfig, TransformerLM, TransformerModel, Tokenizer
from zenlm.checkpoint import atomic_write


def small(**kw):
    return TransformerConfig(**{**dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                       num_encoder_layers=1, num_decoder_layers=1, max_position_embeddings=32), **kw})


@pytest.mark.parametrize("kw", [dict(), dict(num_encoder_layers=0, tie_word_embeddings=False, lm_head_bias=True),
                                dict(num_decoder_layers=0, mlm_transform=True, type_vocab_size=2)])
def test_round_trip_is_bit_exact(tmp_path, kw):
    torch.manual_seed(0)
    model = TransformerLM(small(**kw))
    tok = Tokenizer.train(["some text for a tokenizer"] * 10, vocab_size=60, kind="char")
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again = zenlm.load(tmp_path)
    assert again.config == model.config
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    ids = torch.randint(0, 50, (1, 5))
    args = (ids, ids) if model.config.is_encoder_decoder else (ids,)
    assert torch.equal(model.eval()(*args).logits, again(*args).logits)


def test_backbone_loads_from_lm_checkpoint(tmp_path):
    TransformerLM(small(tie_word_embeddings=False)).save_pretrained(tmp_path)
    backbone = TransformerModel.from_pretrained(tmp_path)
    assert not hasattr(backbone, "lm_head")


def test_truncated_file_names_the_file(tmp_path):
    TransformerLM(small()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        zenlm.load(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    TransformerLM(small()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["decoder.layers.0.mlp.fc_out.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: missing tensor 'decoder.layers.0.mlp.fc_out.weight'"):
        zenlm.load(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    TransformerLM(small()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["embed_tokens.weight"] = torch.zeros(49, 16)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'embed_tokens.weight' has shape \(49, 16\), the model expects \(50, 16\)"):
        zenlm.load(tmp_path)


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        zenlm.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        zenlm.load(tmp_path)


def test_no_pickle_is_ever_written(tmp_path):
    TransformerLM(small()).save_pretrained(tmp_path)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert "embed_tokens.weight" in header


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_average_checkpoints_is_the_elementwise_mean(tmp_path):
    from zenlm.checkpoint import average_checkpoints
    from zenlm.cli import main

    from zenlm.checkpoint import load_model, save_pretrained

    config = small(num_encoder_layers=0)
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = TransformerLM(config)
        save_pretrained(model, tmp_path / f"c{seed}")
        folders.append(tmp_path / f"c{seed}")
    assert main([*["average", *map(str, folders)], "--out", str(tmp_path / "avg")]) == 0
    averaged = load_model(tmp_path / "avg")
    states = [load_model(f).state_dict() for f in folders]
    for name, tensor in averaged.state_dict().items():
        torch.testing.assert_close(tensor, sum(s[name] for s in states) / 3, rtol=0, atol=1e-6)
    other = TransformerLM(small(num_encoder_layers=0, hidden_size=32))
    save_pretrained(other, tmp_path / "other")
    with pytest.raises(ValueError, match="differs from .* at 'hidden_size'"):
        average_checkpoints([folders[0], tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least 2"):
        average_checkpoints([folders[0]], tmp_path / "bad")
    assert main(["average", str(folders[0]), str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")]) == 2
