"""Reading Hugging Face folders safely: sharded and legacy .bin weights load; a pickle that is
more than tensors is refused; every bad input names the file and the tensor or setting at fault."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import zenlm
from zenlm.cli import main
from zenlm.hf import convert_from_hf, load_hf
from hf_helpers import assert_close_where

transformers = pytest.importorskip("transformers")


def tiny_gpt2() -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    model = tiny_gpt2()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return model, folder


def assert_same_logits(hf, folder) -> None:
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert_close_where(zenlm.load(folder)(ids).logits, hf(ids).logits, torch.ones_like(ids))


def copy_config(src, dst) -> None:
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


# --------------------------------------------------------------------------- formats that load
def test_sharded_safetensors_load(tmp_path):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(hf, tmp_path)


def test_legacy_pytorch_bin_and_its_sharded_index_load(gpt2_folder, tmp_path):
    hf, folder = gpt2_folder
    state = hf.state_dict()
    copy_config(folder, tmp_path / "single")
    torch.save(state, tmp_path / "single" / "pytorch_model.bin")
    assert_same_logits(hf, tmp_path / "single")

    copy_config(folder, tmp_path / "sharded")
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, tmp_path / "sharded" / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_logits(hf, tmp_path / "sharded")


class Exploit:
    """Unpickling this would run a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_is_more_than_tensors_is_never_run(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": Exploit(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused to load .*weights_only=True"):
        zenlm.load(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- bad input
def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='mamba' \(MambaForCausalLM\); "
                                         r"supported: bert, gpt2, bart, marian, llama"):
        zenlm.load(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type 'proportional' is not supported; supported: default, linear, dynamic, llama3, yarn, longrope"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "activation 'gelu_pytorch_tanh' is not supported; supported: gelu, silu"),
    ({"mlp_bias": True}, "mlp_bias=True differs from attention_bias=False"),
])
def test_unsupported_settings_of_a_supported_family_are_named(change, message, tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        zenlm.load(tmp_path)


def test_missing_tensor_names_itself_and_the_file(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        zenlm.load(tmp_path)


def test_misshapen_tensor_names_itself_the_file_and_both_shapes(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_attn\.weight' "
                                         r"has shape \(32, 64\), expected \(32, 96\)"):
        zenlm.load(tmp_path)


def test_truncated_weights_file_is_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        zenlm.load(tmp_path)


def test_index_naming_a_missing_or_outside_shard_is_refused(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="lists shard model-00001-of-00002.safetensors"):
        zenlm.load(tmp_path)
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"shard '\.\./elsewhere\.safetensors' is not a file name in"):
        zenlm.load(tmp_path)


def test_folder_without_config_or_weights_says_so(gpt2_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json: not a Hugging Face model folder"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        convert_from_hf(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zenlm.load(tmp_path)
    copy_config(gpt2_folder[1], tmp_path)
    with pytest.raises(FileNotFoundError, match="has no weights: expected model.safetensors"):
        zenlm.load(tmp_path)


def test_convert_cli_bad_input_is_one_line_and_exit_2(gpt2_folder, tmp_path, capsys):
    _, folder = gpt2_folder
    assert main(["convert", "from-hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert main(["convert", "to-hf", str(folder), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "no model folder at" in lines[0] and "already a Hugging Face folder" in lines[1]


def test_importing_hf_weights_never_imports_transformers_or_the_hub(gpt2_folder):
    _, folder = gpt2_folder
    code = ("import sys, zenlm; zenlm.load(sys.argv[1]); "
            "print([m for m in ('transformers', 'huggingface_hub', 'requests') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_legacy_layernorm_gamma_beta_names_load(tmp_path):
    """Early BERT checkpoints (TF ports) call LayerNorm weight/bias gamma/beta."""
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=48)).eval()
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    assert any(k.endswith("gamma") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        assert_close_where(zenlm.load(tmp_path)(ids).last_hidden_state, hf(ids).last_hidden_state, torch.ones_like(ids))


def test_tensors_with_no_place_are_reported_not_dropped_silently(gpt2_folder, tmp_path, caplog):
    _, folder = gpt2_folder
    copy_config(folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["score.weight"] = torch.zeros(2, 32)  # a classification head zenlm has no place for
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="zenlm.hf"):
        zenlm.load(tmp_path)
    assert "1 tensor(s) have no place" in caplog.text and "score.weight" in caplog.text


def test_info_reads_a_hugging_face_folder(gpt2_folder, tmp_path, capsys):
    """`zenlm info` on an HF folder counts what transformers counts; without weights, from config.json
    alone; an unsupported architecture is one line and exit 2."""
    hf, folder = gpt2_folder
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "decoder-only, 0+2 layers, d=32" in out
    assert f"parameters            {hf.num_parameters():,} " in out
    copy_config(folder, tmp_path / "config-only")
    assert main(["info", str(tmp_path / "config-only")]) == 0
    assert f"parameters            {hf.num_parameters():,} " in capsys.readouterr().out
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaModel"]}))
    assert main(["info", str(tmp_path / "mamba")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported architecture model_type='mamba'" in err[0] and "bert, gpt2" in err[0]


def test_a_hub_name_is_never_fetched(monkeypatch):
    """zenlm reads local folders only: a Hub model id fails fast as a missing folder, and no socket
    is opened even with HF_HUB_OFFLINE unset."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("zenlm tried to open a network connection")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(FileNotFoundError, match="Helsinki-NLP/opus-mt-en-de"):
        zenlm.load("Helsinki-NLP/opus-mt-en-de")
    with pytest.raises(FileNotFoundError, match="Helsinki-NLP/opus-mt-en-de"):
        zenlm.load_tokenizer("Helsinki-NLP/opus-mt-en-de")
