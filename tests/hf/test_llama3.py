"""Llama 3.x from Hugging Face folders: each context scaling of RoPE (llama3, linear, dynamic, yarn)
against transformers on sequences longer than the pretraining length; several end tokens (generation
stops on any); Llama 3.2's tied output head. Exported back, transformers gives the same logits."""
import pytest
import torch

import zenlm
from family_checks import NEW, PROMPTS, build, check_all, hf_generate
from zenlm.generation import Generator

transformers = pytest.importorskip("transformers")

ROPES = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=8.0, beta_slow=1.0),
}


def llama3(folder, rope: str, **extra):
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32 if rope == "dynamic" else 128, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                  rope_parameters={"rope_theta": 500.0, **ROPES[rope]}, **extra)
    return build(transformers, "LlamaConfig", "LlamaForCausalLM", folder, **config)


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama3_rope_scaling_matches_transformers(rope, tmp_path):
    hf = llama3(tmp_path / "hf", rope, tie_word_embeddings=rope == "llama3")
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.rope_scaling["rope_type"] == rope
    assert ours.config.tie_word_embeddings == (rope == "llama3")
    if rope == "dynamic":  # zenlm's window is the one the factor stretches to; the batch goes past 32
        assert ours.config.max_position_embeddings == 64
    diffs = check_all(transformers, hf, tmp_path / "hf", tmp_path / "out", cache_length=32 if rope == "dynamic" else None)
    print(f"llama {rope}: {diffs}")


def test_llama3_stops_on_any_of_its_end_tokens(tmp_path):
    """Llama 3 folders list several eos ids (config.json and generation_config.json); zenlm stops on
    each of them, greedy and beam, as transformers does, and writes the list back on export."""
    hf = llama3(tmp_path / "probe", "llama3")
    first = hf_generate(hf, PROMPTS, 1, eos=None, pad=0)
    # two tokens the rows produce mid-way, each ending a different row first
    ends = next([a, b] for a in first[0][2:] for b in first[1][2:]
                if a != b and b not in first[0][:first[0].index(a)] and a not in first[1][:first[1].index(b)])
    hf.config.eos_token_id = hf.generation_config.eos_token_id = ends
    hf.save_pretrained(tmp_path / "hf")
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.eos_token_id == ends[0]
    expected = hf_generate(hf, PROMPTS, 1, eos=ends, pad=0)
    assert {row[-1] for row in expected if len(row) < NEW} == set(ends), "both end tokens should end a row"
    out = Generator(ours).generate(PROMPTS, max_new_tokens=NEW, forced_eos_token_id=None)
    assert out.token_ids == expected
    assert all(g.finish_reason == "stop" for g, row in zip(out, expected) if len(row) < NEW)
    beams = dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False)
    assert (Generator(ours).generate(PROMPTS, max_new_tokens=NEW, **beams).token_ids
            == hf_generate(hf, PROMPTS, 4, eos=ends, pad=0, **{k: v for k, v in beams.items() if k != "num_beams"}))
    zenlm.hf.save_hf(ours, tmp_path / "out")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert back.eos_token_id == ends
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == ends


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "su", "rope_theta": 1e4}, r"llama: rope_type 'su' is not supported; supported: default, linear"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "rope_theta": 1e4, "mystery": 1},
     r"rope_scaling: mystery=1 is not supported for rope_type 'yarn'"),
])
def test_a_rope_setting_zenlm_cannot_honour_is_an_error_naming_it(tmp_path, rope, match):
    import json

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
              "intermediate_size": 96, "vocab_size": 64, "rope_parameters": rope}
    with pytest.raises(ValueError, match=match):
        zenlm.hf.config_from_hf(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        zenlm.hf.read_hf_config(tmp_path)
