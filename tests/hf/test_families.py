"""The family registry of zenlm.hf: every family file is registered once, by its model_type, and
each family's config map runs both ways (zenlm config -> HF config.json -> the same zenlm config).

Needs no transformers: it checks the maps against themselves, so a new family file is covered
here the moment it is listed in ``zenlm.hf.families.FAMILIES``."""
import importlib
import pkgutil

import pytest

import zenlm.hf.families as families
from zenlm import TransformerConfig
from zenlm.hf import FAMILIES, Family, config_from_hf, config_to_hf, family_for, family_of
from zenlm.hf.weights import hf_names, state_names

# small (and non-default) values for whichever of these fields a family maps; the rest keep the family's defaults
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_encoder_layers=2, num_decoder_layers=2, max_position_embeddings=64, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, norm_eps=1e-7, dropout=0.05,
             attention_dropout=0.05, initializer_range=0.01, tie_word_embeddings=False)


def declared_families() -> list[Family]:
    """Every Family record defined in a module of zenlm/hf/families/."""
    found = []
    for info in pkgutil.iter_modules(families.__path__):
        module = importlib.import_module(f"{families.__name__}.{info.name}")
        found += [v for v in vars(module).values() if isinstance(v, Family) and v not in found]
    return found


def small_config(family: Family) -> TransformerConfig:
    """A tiny zenlm config of ``family``, read from an HF config.json that sets only sizes and token ids."""
    hf_config = {"model_type": family.model_type}
    hf_config.update({theirs: SMALL[ours] for ours, (theirs, _) in family.fields.items() if ours in SMALL})
    return config_from_hf(hf_config)


def test_the_registry_lists_every_family_once_by_model_type():
    assert list(FAMILIES) == ["bert", "gpt2", "bart", "marian", "llama", "qwen2", "qwen3", "mistral", "phi3",
                             "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "t5", "m2m_100"]
    assert all(key == family.model_type for key, family in FAMILIES.items())
    declared = declared_families()
    assert sorted(f.model_type for f in declared) == sorted(FAMILIES), "a family file is not listed in FAMILIES"
    assert all(FAMILIES[f.model_type] is f for f in declared)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_config_round_trips_through_hf(model_type):
    family = FAMILIES[model_type]
    config = small_config(family)
    assert config.extra["hf_model_type"] == model_type
    hf_config = config_to_hf(config, family)
    assert hf_config["model_type"] == model_type and hf_config["architectures"] == [family.architecture]
    assert family_of(hf_config) is family
    names = set(hf_names(family, state_names(config)))  # BERT reads whether it has an MLM head from these
    back = config_from_hf(hf_config, names)
    assert back.to_dict() == config.to_dict()
    assert family_for(config) is family


def test_an_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"model_type='mamba'.*supported: bert, gpt2, bart, marian, llama, qwen2, qwen3, "
                                         r"mistral, phi3, gemma2, gemma3_text"):
        family_of({"model_type": "mamba"})
