"""The CLI is a thin layer: each command works, and bad input is one line and exit code 2."""
import subprocess
import sys

import pytest

from zenlm.cli import main


def test_info_on_preset_prints_costs(capsys):
    assert main(["info", "gpt2-small", "--batch-size", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "training FLOPs/token" in out and "optimizer" in out


def test_info_on_checkpoint_folder(tmp_path, capsys):
    from zenlm import TransformerConfig, TransformerLM

    TransformerLM(TransformerConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "decoder-only" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "nonexistent"], "neither a preset"),
    (["info", "tiny", "--seq-len", "100000"], "--seq-len must be in [1, 256], got 100000"),
    (["tokenizer", "train", "missing.txt", "--out", "x"], "no such file: missing.txt"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_tokenizer_train_command(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, 你好世界\n" * 200)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--kind", "bpe", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert "trained bpe tokenizer" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "zenlm.cli", "info", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0 and "parameters" in proc.stdout


def test_import_zenlm_stays_light():
    # (tqdm is not listed: torch.hub itself imports it when present)
    code = ("import sys, zenlm; heavy = [m for m in ('transformers', 'fastapi', 'matplotlib', 'sqlalchemy', "
            "'faiss', 'sacrebleu', 'yaml') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_demo_trains_and_generates(tmp_path, capsys):
    assert main(["demo", "--seconds", "3", "--out", str(tmp_path), "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "sample 1" in out and (tmp_path / "stdlib-tiny" / "model.safetensors").exists() \
        and (tmp_path / "stdlib-tiny" / "tokenizer.json").exists()
