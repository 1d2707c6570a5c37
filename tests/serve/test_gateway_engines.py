"""Managed engines (zenlm/serve/engines.py) without running llama.cpp: which server is chosen and
how it is called, model names, and the errors a user meets (no llama.cpp at all, no model file)."""
from __future__ import annotations

import importlib.util
import os
import stat

import pytest

from .conftest import save_tiny


@pytest.fixture
def gguf_file(tmp_path):
    import zenlm
    from zenlm.gguf import export_gguf

    folder = save_tiny(tmp_path / "tiny", window=96)
    model = zenlm.load(str(folder))
    export_gguf(model, model.tokenizer, tmp_path / "tiny.gguf", type="f32")
    return tmp_path / "tiny.gguf"


def test_llama_server_binary_is_preferred_and_called_with_the_models_context(gguf_file, tmp_path, monkeypatch):
    from zenlm.serve import engines

    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(engines, "LLAMA_SERVER_BIN", binary)
    server = engines.LlamaCppServer(engines.LlamaCppConfig(f"small={gguf_file}", threads=3, port=8123))
    try:
        assert (server.name, server.url) == ("small", "http://127.0.0.1:8123")
        cmd = server.command(str(gguf_file))
        assert cmd[0] == str(binary)
        pairs = dict(zip(cmd[1::2], cmd[2::2]))
        assert pairs == {"-m": str(gguf_file), "--host": "127.0.0.1", "--port": "8123", "-c": "96", "--alias": "small",
                         "-t": "3"}
    finally:
        server.stop()


def test_without_the_binary_llama_cpp_python_serves(gguf_file, monkeypatch, tmp_path):
    from zenlm.serve import engines

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: pip install 'zenlm[llamacpp]'")
    monkeypatch.setattr(engines, "LLAMA_SERVER_BIN", tmp_path / "none" / "llama-server")
    server = engines.LlamaCppServer(engines.LlamaCppConfig(str(gguf_file), context=64))
    try:
        cmd = server.command(str(gguf_file))
        assert cmd[1:3] == ["-m", "llama_cpp.server"] and server.name == "tiny"
        pairs = dict(zip(cmd[3::2], cmd[4::2]))
        assert pairs["--n_ctx"] == "64" and pairs["--model_alias"] == "tiny" and "--n_threads" not in pairs
    finally:
        server.stop()


def test_no_llama_cpp_at_all_is_one_error_naming_both_ways_before_any_export(tmp_path, monkeypatch):
    from zenlm.serve import engines

    folder = save_tiny(tmp_path / "tiny")
    real = importlib.util.find_spec
    monkeypatch.setattr(engines, "LLAMA_SERVER_BIN", tmp_path / "none" / "llama-server")
    monkeypatch.setattr(engines.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    server = engines.LlamaCppServer(engines.LlamaCppConfig(str(folder)))
    with pytest.raises(ValueError, match=r"needs llama\.cpp: build .*llama-server or pip install 'zenlm\[llamacpp\]'"):
        server.start()
    assert server.gguf is None and server.process is None  # nothing exported, nothing started


def test_a_missing_model_is_named(tmp_path):
    from zenlm.serve.engines import LlamaCppConfig, LlamaCppServer, parse_engine_model

    with pytest.raises(FileNotFoundError, match="no model at .*nope.gguf"):
        LlamaCppServer(LlamaCppConfig(str(tmp_path / "nope.gguf")))
    folder = save_tiny(tmp_path / "m")
    assert parse_engine_model(str(folder)) == ("m", str(folder.resolve()))
    assert parse_engine_model(f"x={folder}")[0] == "x"
    assert os.path.isabs(parse_engine_model(f"x={folder}")[1])
