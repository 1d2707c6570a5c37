"""The CLI is a thin layer: each command works, and bad input is one line and exit code 2."""
import re
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
    # trained by the library's Trainer (its metrics log and checkpoint), saying which precision it used
    assert "with zenlm's Trainer" in out and (tmp_path / "train" / "metrics.jsonl").is_file()
    assert re.search(r"^precision: (bf16 autocast|fp32): this CPU ", out, re.M), out


def test_evaluate_chat_is_a_command(tmp_path, capsys):
    # the README shows it; its parser was once written and never registered
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "chat", "--help"])
    assert done.value.code == 0 and "--data" in capsys.readouterr().out
    assert main(["evaluate", "chat", str(tmp_path / "none"), "--data", "x.jsonl"]) == 2
    assert "no model folder" in capsys.readouterr().err


def test_billing_report_defaults_to_this_month(tmp_path, capsys):
    pytest.importorskip("sqlalchemy", reason="the serve extra is not installed")
    import time

    assert main(["billing", "report", "--database", str(tmp_path / "z.sqlite3"), "--by", "customer"]) == 0
    assert f"{time.strftime('%Y-%m', time.gmtime())} by customer" in capsys.readouterr().out
    assert main(["billing", "report", "--database", str(tmp_path / "z.sqlite3"), "--month", "2026-13"]) == 2
    assert "month must be YYYY-MM" in capsys.readouterr().err


def test_demo_help_explains_every_option(capsys):
    import argparse

    from zenlm.cli import build_parser

    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    for action in parser._actions:
        assert action.help, f"zenlm demo {'/'.join(action.option_strings)} has no help text"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "address to serve on" in out and "next free one" in out and "seed for weights" in out


def test_demo_port_taken_fails_before_training_and_names_the_flag(tmp_path, capsys):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["demo", "--port", str(port), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err and "make demo ARGS=" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "stdlib-tiny").exists()  # nothing trained


def test_demo_moves_off_a_taken_default_port(monkeypatch, capsys):
    import socket

    from zenlm import demo

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(demo, "DEFAULT_PORT", taken)
        port = demo.pick_port("127.0.0.1")
    assert port != taken and port > taken
    assert f"127.0.0.1:{taken} is in use; serving on {port} instead" in capsys.readouterr().out


def test_make_demo_installs_only_its_own_extras_and_passes_args():
    import shutil
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run(["make", "-n", "-B", *a], cwd=root, capture_output=True, text=True, check=True).stdout
    demo = run("demo", "ARGS=--port 8001")
    installs = [line for line in demo.splitlines() if "pip install -e" in line]
    assert installs == [".venv/bin/pip install -e '.[demo]'"], demo
    assert ".venv/bin/zenlm demo --port 8001" in demo
    test = run("test").splitlines()
    torch_at = next(i for i, line in enumerate(test) if "pip install torch==2.13.0" in line)
    extras_at = next(i for i, line in enumerate(test) if "pip install -e '.[test,serve,demo]'" in line)
    assert torch_at < extras_at and "python -m pytest" in test[-1]
