"""Generation settings travel with an imported folder: a MarianMT folder set up like the released
opus-mt ones (bad_words_ids=[[pad]], forced_eos_token_id, 4 beams, max_length, renormalize_logits)
decodes, with zenlm's defaults, exactly the tokens transformers' generate() picks with its defaults,
whether the settings sit in generation_config.json or (older folders) in config.json."""
import json

import pytest
import torch

import zenlm
from zenlm.generation import Generator
from zenlm.hf import convert_from_hf, load_hf, save_hf

transformers = pytest.importorskip("transformers")

PAD, EOS, VOCAB = 2, 0, 120
SOURCES = [[5, 17, 33, 8, 91, 40, 12, 77, EOS], [64, 9, 21, EOS], [100, 3, 55, 56, 57, 23, EOS]]
OPUS_MT = {"bad_words_ids": [[PAD]], "bos_token_id": 0, "decoder_start_token_id": PAD, "eos_token_id": EOS,
           "forced_eos_token_id": EOS, "max_length": 9, "num_beams": 4, "pad_token_id": PAD,
           "renormalize_logits": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MarianConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                       decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=PAD,
                                       eos_token_id=EOS, decoder_start_token_id=PAD, scale_embedding=True,
                                       init_std=0.2)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # make the pad token a strong candidate, so banning it changes the output
        model.final_logits_bias.normal_()
        model.final_logits_bias[0, PAD] += 12.0
        model.final_logits_bias[0, EOS] -= 12.0  # and end of sequence unlikely, so forcing it matters
    new = tmp_path_factory.mktemp("marian-generation-config")
    model.save_pretrained(new)
    (new / "generation_config.json").write_text(json.dumps(OPUS_MT))
    old = tmp_path_factory.mktemp("marian-config-json")  # older folders: generation keys in config.json only
    model.save_pretrained(old)
    (old / "generation_config.json").unlink()
    hf_config = json.loads((old / "config.json").read_text())
    hf_config.update(OPUS_MT)
    (old / "config.json").write_text(json.dumps(hf_config))
    return new, old


def hf_default_generate(folder) -> list[list[int]]:
    """transformers' generate() with nothing but the padded batch: every setting from the folder."""
    model = transformers.MarianMTModel.from_pretrained(folder).eval()
    width = max(map(len, SOURCES))
    ids = torch.full((len(SOURCES), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(SOURCES):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask)
    rows = []
    for seq in out[:, 1:].tolist():
        rows.append(seq[:seq.index(EOS) + 1] if EOS in seq else seq)
    return rows, model


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_imported_marian_decodes_like_generate_with_its_defaults(folders, where, tmp_path):
    folder = folders[0] if where == "generation_config.json" else folders[1]
    expected, hf = hf_default_generate(folder)
    assert hf.generation_config.bad_words_ids == [[PAD]] and hf.generation_config.num_beams == 4
    assert all(len(r) <= OPUS_MT["max_length"] - 1 for r in expected)
    ours = zenlm.load(folder)
    defaults = ours.config.extra["generation"]
    assert defaults["bad_words_ids"] == [[PAD]] and defaults["forced_eos_token_id"] == EOS
    assert defaults["num_beams"] == 4 and defaults["max_new_tokens"] == OPUS_MT["max_length"] - 1
    assert Generator(ours).generate(SOURCES).token_ids == expected
    # the settings are in the converted checkpoint too
    convert_from_hf(folder, tmp_path / "zenlm")
    assert Generator(zenlm.load(tmp_path / "zenlm")).generate(SOURCES).token_ids == expected


def test_each_carried_setting_changes_the_output(folders):
    """Switching any one of them off changes the tokens, so the parity above would catch a setting
    that failed to travel (or that zenlm applied differently)."""
    ours = zenlm.load(folders[0])
    with_all = Generator(ours).generate(SOURCES).token_ids
    assert not any(PAD in row for row in with_all) and all(row[-1] == EOS for row in with_all)
    for off in (dict(bad_words_ids=()), dict(forced_eos_token_id=None), dict(renormalize_logits=False)):
        assert Generator(ours).generate(SOURCES, **off).token_ids != with_all, off


def test_greedy_with_the_folder_settings_matches_generate(folders):
    model = transformers.MarianMTModel.from_pretrained(folders[0]).eval()
    ours = zenlm.load(folders[0])
    for source in SOURCES:
        with torch.no_grad():
            ref = model.generate(torch.tensor([source]), num_beams=1)[0, 1:].tolist()
        assert Generator(ours).generate(source, num_beams=1).token_ids[0] == ref


def test_export_writes_the_settings_back(folders, tmp_path):
    """A model imported from config.json-only settings writes them as generation_config.json."""
    ours = load_hf(folders[1])
    save_hf(ours, tmp_path / "hf")
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert back.bad_words_ids == [[PAD]] and back.forced_eos_token_id == EOS and back.num_beams == 4
    assert back.max_length == OPUS_MT["max_length"] and back.decoder_start_token_id == PAD
    assert back.renormalize_logits is True


def test_bad_generation_settings_are_refused_by_name():
    from zenlm.generation import GenerationConfig

    with pytest.raises(ValueError, match="forced_eos_token_id must be a token id >= 0"):
        GenerationConfig(forced_eos_token_id=-1)
    config = zenlm.TransformerConfig.from_preset("tiny")
    with pytest.raises(ValueError, match=r"forced_bos_token_id holds token id .* outside \[0, vocab_size="):
        Generator(zenlm.TransformerLM(config)).generate([1, 2, 3], forced_bos_token_id=config.vocab_size,
                                                        max_new_tokens=2)
