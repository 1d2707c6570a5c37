"""Every recipe in recipes/ is a valid training config (keys, types, ranges), with its data where
`zenlm prepare` puts it; the application recipes record what the apps need."""
from pathlib import Path

import pytest

from zenlm.train import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_a_valid_config(recipe):
    config = TrainConfig.from_yaml(recipe)
    assert config.data.train
    if config.data.objective == "seq2seq" and "translation" in str(config.model.get("extra", {})):
        extra = config.model["extra"]
        assert extra["source_lang"] != extra["target_lang"]
        assert config.model["num_encoder_layers"] > 0 and config.model["num_decoder_layers"] > 0


def test_noncommercial_data_is_flagged():
    for name in ("chat-dailydialog.yaml", "dialog-pretrain.yaml"):
        text = (RECIPES[0].parent / name).read_text(encoding="utf-8")
        assert "CC BY-NC-SA 4.0" in text and "NON-COMMERCIAL" in text
