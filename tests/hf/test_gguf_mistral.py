"""Mistral through GGUF: llama.cpp's converter writes Mistral as architecture "llama", whose graph reads no
sliding window and attends to every position. zenlm refuses such an export by default, naming the window;
with ``ignore_sliding_window`` (CLI: --ignore-sliding-window) it writes the converter's file and says, in a
logged warning, the report and the CLI's stderr, that llama.cpp equals the model only within the window.
transformers' GGUF reader shows exactly that on the file: equal logits up to the window, different after."""
import logging

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import zenlm  # noqa: E402
from zenlm.cli import main  # noqa: E402
from zenlm.gguf import export_gguf, inspect_gguf  # noqa: E402

WINDOW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random transformers Mistral (window 8) saved with its (byte-level BPE) tokenizer."""
    from hf_helpers import bpe, perturbed, save_hf

    tok = bpe(["<unk>", "<s>", "</s>"], vocab_size=300)
    cfg = transformers.MistralConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=128, sliding_window=WINDOW, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    hf = perturbed(transformers.MistralForCausalLM, cfg)
    path = tmp_path_factory.mktemp("mistral") / "hf"
    return save_hf(hf, path, tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"), hf


def test_window_is_refused_by_name_then_written_with_a_warning(folder, tmp_path, caplog):
    path, hf = folder
    model = zenlm.load(path)
    with pytest.raises(ValueError, match=r"sliding_window=8 \(llama.cpp's graph attends to every position"):
        export_gguf(model, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with caplog.at_level(logging.WARNING, logger="zenlm.gguf"):
        report = export_gguf(model, None, tmp_path / "m.gguf", ignore_sliding_window=True)
    assert report["architecture"] == "llama" and len(report["warnings"]) == 1
    assert "sliding_window=8" in report["warnings"][0] and "attends to every position" in caplog.text
    assert not any("sliding_window" in k for k in inspect_gguf(tmp_path / "m.gguf")["keys"])
    # what the file means, read by transformers: the model within the window, full attention after it
    ids = torch.randint(3, hf.config.vocab_size, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    reader = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want, got = hf(ids).logits, reader.eval()(ids).logits
    assert (got[:, :WINDOW] - want[:, :WINDOW]).abs().max() < 1e-4
    assert (got[:, WINDOW:] - want[:, WINDOW:]).abs().max() > 1e-3


def test_cli_refuses_then_warns_on_stderr(folder, tmp_path, capsys):
    path, _ = folder
    assert main(["export", "gguf", str(path), str(tmp_path / "m.gguf"), "--type", "f32"]) == 2
    assert "sliding_window=8" in capsys.readouterr().err
    assert main(["export", "gguf", str(path), str(tmp_path / "m.gguf"), "--type", "f32",
                 "--ignore-sliding-window"]) == 0
    out = capsys.readouterr()
    assert "llama f32" in out.out and "warning: llama.cpp's llama graph attends to every position" in out.err
