"""`zenlm demo` and `make demo` (cli/demo.py)."""
import re
import subprocess

import pytest

from zenlm.cli import main


def test_demo_trains_and_generates(tmp_path, capsys):
    assert main(["demo", "--seconds", "3", "--out", str(tmp_path), "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "sample 1" in out and (tmp_path / "stdlib-tiny" / "model.safetensors").exists() \
        and (tmp_path / "stdlib-tiny" / "tokenizer.json").exists()
    # trained by the library's Trainer (its metrics log and checkpoint), saying which precision it used
    assert "with zenlm's Trainer" in out and (tmp_path / "train" / "metrics.jsonl").is_file()
    assert re.search(r"^precision: (bf16 autocast|fp32): this CPU ", out, re.M), out


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
    root = Path(__file__).resolve().parents[2]
    # --no-print-directory: under `make test` (CI) this make is nested and would add "make[1]: ..." lines
    run = lambda *a: subprocess.run(["make", "-n", "-B", "--no-print-directory", *a], cwd=root, capture_output=True,
                                    text=True, check=True).stdout
    demo = run("demo", "ARGS=--port 8001")
    installs = [line for line in demo.splitlines() if "pip install -e" in line]
    assert installs == [".venv/bin/pip install -e '.[demo]'"], demo
    assert ".venv/bin/zenlm demo --port 8001" in demo
    test = run("test").splitlines()
    torch_at = next(i for i, line in enumerate(test) if "pip install torch==2.13.0" in line)
    extras_at = next(i for i, line in enumerate(test) if "pip install -e '.[test,serve,demo]'" in line)
    assert torch_at < extras_at and "python -m pytest" in test[-1]
