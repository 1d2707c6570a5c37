"""`zenlm`: the entry point and its one rule: bad input is one line and exit code 2, never a traceback."""
import subprocess
import sys

import pytest

from zenlm.cli import main


@pytest.mark.parametrize("argv,message", [
    (["info", "nonexistent"], "neither a preset"),
    (["info", "tiny", "--seq-len", "100000"], "--seq-len must be in [1, 256], got 100000"),
    (["tokenizer", "train", "missing.txt", "--out", "x"], "no such file: missing.txt"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "zenlm.cli", "info", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0 and "parameters" in proc.stdout


def test_import_zenlm_stays_light():
    # (tqdm is not listed: torch.hub itself imports it when present)
    code = ("import sys, zenlm; heavy = [m for m in ('transformers', 'fastapi', 'matplotlib', 'sqlalchemy', "
            "'faiss', 'sacrebleu', 'yaml') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
