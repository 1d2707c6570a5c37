"""Engines zenlm starts itself and sells through the gateway: llama.cpp's OpenAI-compatible server
as a managed child process (``zenlm serve --engine llama.cpp MODEL.gguf``), registered as an upstream
(``upstream.py``), so a user gets llama.cpp's CPU speed behind zenlm's keys, budgets and ledger
with one command.

Which server: the ``llama-server`` binary when scripts/build-llamacpp.sh built one (llama.cpp
built for this CPU, under ~/.cache/zenlm/llama.cpp), else llama-cpp-python's
``python -m llama_cpp.server`` (``pip install 'zenlm[llamacpp]'``). It always runs in its own process: llama.cpp beside torch in one process
crashes. A model folder is exported to GGUF (f32) first. The child listens on 127.0.0.1 only, dies
with the gateway (stopped on exit, and the kernel sends it SIGTERM if the gateway is killed), and
its log goes to a file named in any error. llama.cpp's server reports no usage for streams: the
gateway counts those with the GGUF's own tokenizer, exactly the delivered text's tokens.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("zenlm.serve.engines")

LLAMA_SERVER_BIN: Optional[Path] = None  # a llama-server to use; None: the one scripts/build-llamacpp.sh built


def llama_server_bin() -> Path:
    """The llama-server to start: ``LLAMA_SERVER_BIN`` when set, else where scripts/build-llamacpp.sh leaves
    it, looked up when a server starts (not at import): ``$ZENLM_LLAMACPP_DIR`` (default
    ~/.cache/zenlm/llama.cpp), in ``<version>/bin/`` (the newest version built) or ``bin/``."""
    if LLAMA_SERVER_BIN is not None:
        return LLAMA_SERVER_BIN.expanduser()
    root = Path(os.environ.get("ZENLM_LLAMACPP_DIR") or "~/.cache/zenlm/llama.cpp").expanduser()
    versioned = sorted(root.glob("*/bin/llama-server"), key=lambda p: p.stat().st_mtime)
    return versioned[-1] if versioned else root / "bin" / "llama-server"


ENGINES = ("zenlm", "llama.cpp")
MAX_CONTEXT = 4096  # the context llama.cpp allocates at most (its KV cache), unless asked for more


@dataclass
class LlamaCppConfig:
    """One llama.cpp server: what it serves and how."""

    model: str  # a .gguf file, or a model folder (exported to GGUF f32 on start)
    name: Optional[str] = None  # the model name clients ask for (default: the file's stem / folder's name)
    port: Optional[int] = None  # default: a free port on 127.0.0.1
    threads: Optional[int] = None  # default: llama.cpp's choice
    context: Optional[int] = None  # default: the model's context length, at most MAX_CONTEXT
    timeout_s: float = 60.0  # the upstream's timeout (connect and between bytes)
    startup_s: float = 180.0  # how long the child may take to load and answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends this child SIGTERM when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def parse_engine_model(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` -> (name, path); the name defaults to the file's stem or the folder's name."""
    name, sep, path = spec.partition("=")
    if not sep or os.path.exists(spec):
        name, path = "", spec
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path} (give a .gguf file or a model folder)")
    p = Path(path).resolve()
    return name or (p.stem if p.is_file() else p.name), str(p)


class LlamaCppServer:
    """A llama.cpp server as a child process: ``start()`` launches it and waits until it answers,
    ``upstream()`` is the gateway's Upstream for it, ``stop()`` ends it (also on ``with`` exit)."""

    def __init__(self, config: LlamaCppConfig):
        self.config = config
        self.name, self.source = parse_engine_model(config.model)
        self.port = config.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self._tmp = tempfile.TemporaryDirectory(prefix="zenlm-llamacpp-")
        self.log_path = Path(self._tmp.name) / "llama.cpp.log"
        self.gguf: Optional[str] = None

    # ------------------------------------------------------------------ what to run
    def _gguf(self) -> str:
        """The GGUF file to serve: the one given, or the folder exported (f32: every llama.cpp reads it)."""
        if os.path.isfile(self.source):
            return self.source
        import zenlm

        from ..gguf import export_gguf

        model = zenlm.load(self.source)
        out = Path(self._tmp.name) / f"{self.name}.gguf"
        export_gguf(model, getattr(model, "tokenizer", None), out, type="f32")
        log.info("exported %s to %s for llama.cpp", self.source, out)
        return str(out)

    def _context(self, gguf_path: str) -> int:
        if self.config.context:
            return int(self.config.context)
        import gguf

        from ..gguf import read_metadata

        meta = read_metadata(gguf.GGUFReader(gguf_path))
        arch = meta.get("general.architecture", "llama")
        return min(int(meta.get(f"{arch}.context_length", 2048)), MAX_CONTEXT)

    def command(self, gguf_path: str) -> list[str]:
        """llama-server when scripts/build-llamacpp.sh built it, else llama-cpp-python's server."""
        ctx, threads = self._context(gguf_path), self.config.threads
        binary = self._binary()
        if binary is not None:
            cmd = [str(binary), "-m", gguf_path, "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx),
                   "--alias", self.name]
            return cmd + (["-t", str(threads)] if threads else [])
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(ctx), "--model_alias", self.name]
        return cmd + (["--n_threads", str(threads)] if threads else [])

    @staticmethod
    def _binary() -> Optional[Path]:
        """llama-server built for this machine, or None (then llama-cpp-python's server); a ValueError
        naming both when there is neither."""
        binary = llama_server_bin()
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError(f"--engine llama.cpp needs llama.cpp: build {binary} or "
                             "pip install 'zenlm[llamacpp]' (llama-cpp-python with its server)")
        return None

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "LlamaCppServer":
        self._binary()  # before any export: say at once when there is no llama.cpp to run
        self.gguf = self._gguf()
        cmd = self.command(self.gguf)
        log.info("starting llama.cpp for %s: %s", self.name, " ".join(cmd))
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ValueError(f"llama.cpp for {self.name} exited with {self.process.returncode} while starting: "
                                 f"{self._log_tail()}")
            for path in ("/health", "/v1/models"):
                try:
                    with urllib.request.urlopen(self.url + path, timeout=2) as r:
                        if r.status == 200:
                            return
                except OSError:  # not listening yet, 503 while loading, 404 for /health on llama_cpp.server
                    continue
            time.sleep(0.1)
        raise ValueError(f"llama.cpp for {self.name} did not answer within {self.config.startup_s:.0f} s: "
                         f"{self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def upstream(self):
        """The gateway's Upstream for this child: its URL, the GGUF's tokenizer for counting streams."""
        from .upstream_config import make_upstream

        return make_upstream(self.name, [self.url], {"tokenizer": self.gguf, "timeout": self.config.timeout_s},
                             f"--engine llama.cpp {self.name}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._tmp.cleanup()

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ENGINES", "LLAMA_SERVER_BIN", "LlamaCppConfig", "LlamaCppServer", "llama_server_bin", "parse_engine_model"]
