"""llama.cpp as the peer the benchmarks measure zenlm against, driven through its own tools.

The tools are built once by ``bash scripts/build-llamacpp.sh`` from the llama-cpp-python sdist's
vendor/llama.cpp and cached outside the repository (``~/.cache/zenlm/llama.cpp/<version>/``: ``bin/``
with llama-server, llama-bench, llama-cli, llama-quantize, llama-perplexity; ``src/`` with the sdist,
whose vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py convert a Hugging Face folder). Everything
llama.cpp runs in its own process: beside torch in one process its runtime crashed.

Every function returns a plain dict. Where a tool is missing, ``missing(...)`` gives the one line a
benchmark prints instead of its llama.cpp cells ("skipped: ...: build with ..."); the functions that
need the tool raise ``FileNotFoundError`` with that line.

    from llamacpp_peer import missing, model_file, bench, serving, greedy, perplexity
    if (why := missing("llama-bench", "converter")): print(why)
    else:
        q8 = model_file(hf_folder, "q8_0", out_dir)                  # convert_hf_to_gguf.py --outtype q8_0
        q4 = model_file(hf_folder, "q4_0", out_dir)                  # f32 file, then llama-quantize Q4_0
        bench(q8["path"])                                            # llama-bench -p 512 -n 64 -t 2: pp/tg tokens/s
        greedy(q8["path"], prompt_ids, 64)                           # llama-server, temperature 0
        with serving(q8["path"], parallel=32) as server: ...         # server["url"] on a free loopback port

Measured on a Sapphire Rapids CPU: llama.cpp built with -march=native (its default, and what pip's
llama-cpp-python build does) compiles ggml's AMX path, and there every Q8_0/Q4_0 model dies on its first
evaluation (SIGSEGV at ``ldtilecfg`` in ggml_backend_amx_mul_mat; llama.cpp PR #26954): the build script
therefore switches instruction sets on from the CPU flags, AMX never. ``find_llamacpp()["cmake_args"]``
says what the cached build used.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

VERSION = os.environ.get("LLAMACPP_VERSION", "0.3.36")
TOOLS = ("llama-server", "llama-bench", "llama-cli", "llama-quantize", "llama-perplexity")
BUILD_HINT = ("build them with `bash scripts/build-llamacpp.sh` "
              "(llama.cpp from the llama-cpp-python sdist, ~25 min on 2 cores)")
KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # what model_file makes
_CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- where things are
def llamacpp_root() -> Path:
    """The cache folder of the build (``$ZENLM_LLAMACPP_DIR/<version>``, default ~/.cache/zenlm/llama.cpp)."""
    base = os.environ.get("ZENLM_LLAMACPP_DIR") or Path.home() / ".cache" / "zenlm" / "llama.cpp"
    return Path(base) / VERSION


def find_llamacpp(root: Optional[PathLike] = None) -> dict:
    """What is built: each tool's path (None where absent), the converter, the CMake ISA flags used."""
    root = Path(root) if root else llamacpp_root()
    tools = {t: (str(root / "bin" / t) if os.access(root / "bin" / t, os.X_OK) else None) for t in TOOLS}
    converter = root / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    args_file = root / "bin" / "cmake-args.txt"
    return {"root": str(root), "version": VERSION, "tools": tools,
            "converter": str(converter) if converter.is_file() else None,
            "cmake_args": args_file.read_text().split() if args_file.is_file() else [],
            "missing": [t for t, p in tools.items() if p is None] + ([] if converter.is_file() else ["converter"])}


def missing(*needs: str) -> Optional[str]:
    """None when every tool in ``needs`` (names from TOOLS, or "converter") is there; else the line a
    benchmark prints in place of its llama.cpp cells."""
    found = find_llamacpp()
    absent = [n for n in (needs or TOOLS + ("converter",)) if n in found["missing"]]
    if not absent:
        return None
    return f"skipped: llama.cpp's {', '.join(absent)} not found in {found['root']}: {BUILD_HINT}"


def tool(name: str) -> str:
    """The path of one tool, or FileNotFoundError carrying the skip line."""
    path = find_llamacpp()["tools"].get(name)
    if path is None:
        raise FileNotFoundError(missing(name) or f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    return path


def _run(cmd: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    return proc


# --------------------------------------------------------------------------- model files
# llama.cpp's converter knows a BPE pre-tokenizer by the hash of the ids it gives for one fixed text and
# refuses any other; a byte-level BPE trained here splits text as GPT-2 does, so it is declared "gpt-2"
_CONVERT = """
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
convert_hf_to_gguf.main()
"""


def convert_hf(folder: PathLike, out: PathLike, outtype: str = "f32") -> dict:
    """llama.cpp's own converter (the sdist's convert_hf_to_gguf.py with its gguf-py) on a Hugging Face
    folder (config.json, safetensors, tokenizer.json): ``outtype`` f32, f16, bf16 or q8_0."""
    if outtype not in _CONVERTER_TYPES:
        raise ValueError(f"outtype {outtype!r}: llama.cpp's converter writes {', '.join(_CONVERTER_TYPES)}")
    converter = find_llamacpp()["converter"]
    if converter is None:
        raise FileNotFoundError(missing("converter"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _run([sys.executable, "-c", _CONVERT, str(Path(converter).parent), str(folder), "--outtype", outtype,
          "--outfile", str(out)], 3600, "convert_hf_to_gguf.py")
    return {"path": str(out), "type": outtype, "bytes": out.stat().st_size, "seconds": time.perf_counter() - start,
            "made_by": "convert_hf_to_gguf.py"}


def quantize(src: PathLike, out: PathLike, qtype: str = "Q4_0", threads: int = 2, pure: bool = False) -> dict:
    """``llama-quantize src out qtype``. By default llama.cpp keeps some tensors wider (the output head
    of a Q4_0 model in Q6_K/Q8_0); ``pure=True`` makes every matrix ``qtype``."""
    out = Path(out)
    start = time.perf_counter()
    cmd = [tool("llama-quantize")] + (["--pure"] if pure else []) + [str(src), str(out), qtype.upper(), str(threads)]
    _run(cmd, 3600, "llama-quantize")
    return {"path": str(out), "type": qtype.lower(), "bytes": out.stat().st_size,
            "seconds": time.perf_counter() - start, "made_by": "llama-quantize" + (" --pure" if pure else "")}


def model_file(folder: PathLike, kind: str, out_dir: PathLike, pure: bool = False) -> dict:
    """A GGUF of the Hugging Face ``folder`` at ``kind`` (f32, f16, bf16, q8_0 by the converter; q4_0 and
    q4_k_m by llama-quantize from the f32 file), made once in ``out_dir`` and reused while newer than the
    folder's weights."""
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: llamacpp_peer makes {', '.join(KINDS)}")
    folder, out_dir = Path(folder), Path(out_dir)
    out = out_dir / f"{folder.name}-{kind}{'-pure' if pure and kind not in _CONVERTER_TYPES else ''}.gguf"
    weights = max((p.stat().st_mtime for p in folder.glob("*.safetensors")), default=0.0)
    if out.is_file() and out.stat().st_mtime >= weights:
        return {"path": str(out), "type": kind, "bytes": out.stat().st_size, "seconds": 0.0, "made_by": "cache"}
    if kind in _CONVERTER_TYPES:
        return convert_hf(folder, out, kind)
    return quantize(model_file(folder, "f32", out_dir)["path"], out, kind, pure=pure)


# --------------------------------------------------------------------------- llama-bench
def bench(model: PathLike, n_prompt: int = 512, n_gen: int = 64, threads: int = 2, repetitions: int = 3,
          extra: Sequence[str] = ()) -> dict:
    """``llama-bench -m model -p n_prompt -n n_gen -t threads -r repetitions -o json``: prompt processing
    (``pp_tps``, a batch of n_prompt tokens) and decode (``tg_tps``, n_gen tokens one at a time) tokens/s,
    mean and standard deviation over the repetitions, with llama.cpp's own description of the run."""
    cmd = [tool("llama-bench"), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", str(repetitions), "-o", "json", *extra]
    rows = json.loads(_run(cmd, 3600, "llama-bench").stdout)
    out = {"model": str(model), "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": repetitions}
    for row in rows:
        key = "pp" if row.get("n_gen", 0) == 0 else "tg"
        out[f"{key}_tps"], out[f"{key}_std"] = float(row["avg_ts"]), float(row["stddev_ts"])
    first = rows[0] if rows else {}
    out.update({k: first.get(k) for k in ("build_commit", "cpu_info", "model_type", "model_size", "model_n_params",
                                          "backends", "n_batch", "n_ubatch")})
    out["raw"] = rows
    return out


# --------------------------------------------------------------------------- llama-perplexity
def perplexity(model: PathLike, text_file: PathLike, ctx: int = 512, threads: int = 2,
               chunks: Optional[int] = None, extra: Sequence[str] = ()) -> dict:
    """``llama-perplexity -f text_file -c ctx``: llama.cpp's perplexity over non-overlapping ``ctx``-token
    windows (scored on each window's second half, as llama.cpp does), ``ppl`` and its ``ppl_err``; ``extra``:
    more arguments (e.g. ``--kl-divergence-base FILE``)."""
    cmd = [tool("llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-t", str(threads),
           "-b", str(ctx)] + (["--chunks", str(chunks)] if chunks else []) + [str(a) for a in extra]
    proc = _run(cmd, 7200, "llama-perplexity")
    text = proc.stdout + proc.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    # the running estimate after each chunk, "[k]ppl," on stdout: its last value is the final estimate (the
    # "Final estimate" line goes through llama.cpp's asynchronous logger, which may not flush before exit)
    running = re.findall(r"\[(\d+)\]([0-9.]+),", proc.stdout)
    if not found and not running:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{text[-2000:]}")
    return {"model": str(model), "ppl": float(found.group(1)) if found else float(running[-1][1]),
            "ppl_err": float(found.group(2)) if found else None, "ctx": ctx,
            "chunks": int(running[-1][0]) if running else chunks}


# --------------------------------------------------------------------------- llama-server
def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: PathLike, parallel: int = 1, threads: int = 2, ctx_per_slot: int = 512,
                 port: Optional[int] = None, extra: Sequence[str] = (), timeout: float = 300) -> dict:
    """``llama-server -m model -t threads -np parallel -c parallel*ctx_per_slot`` (continuous batching) on
    127.0.0.1 at a free port; returns once /health answers 200. The dict carries the process: pass it
    to ``stop_server``."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    cmd = [tool("llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = {"url": f"http://127.0.0.1:{port}", "port": port, "pid": proc.pid, "process": proc, "log": log.name,
              "parallel": parallel, "threads": threads, "model": str(model)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(server["url"] + "/health", timeout=5) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    stop_server(server)
    raise TimeoutError(f"llama-server did not answer /health within {timeout:.0f} s: {log.name}")


def stop_server(server: dict) -> None:
    """Terminate the server ``start_server`` started (killed if it does not stop within 10 s)."""
    proc = server["process"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(model: PathLike, **kwargs) -> Iterator[dict]:
    """``with serving(path, parallel=32) as server:`` start_server ... stop_server."""
    server = start_server(model, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)


def complete(server: dict, prompt_ids: Sequence[int], n: int, timeout: float = 600) -> dict:
    """One greedy request to llama-server's native /completion endpoint: ``n`` tokens after the prompt
    ids (temperature 0, end-of-text ignored, no prompt cache), with the server's own timings."""
    body = {"prompt": [int(i) for i in prompt_ids], "n_predict": n, "temperature": 0.0, "top_k": 1,
            "ignore_eos": True, "cache_prompt": False, "return_tokens": True}
    req = urllib.request.Request(server["url"] + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = json.loads(r.read())
    timings = data.get("timings", {})
    return {"tokens": [int(t) for t in data.get("tokens", [])], "text": data.get("content", ""),
            "prompt_tps": timings.get("prompt_per_second"), "decode_tps": timings.get("predicted_per_second"),
            "prompt_ms": timings.get("prompt_ms"), "decode_ms": timings.get("predicted_ms")}


def greedy(model: PathLike, prompt_ids: Sequence[int], n: int, threads: int = 2) -> dict:
    """``n`` greedy tokens after ``prompt_ids`` from llama.cpp: llama-server when it is built, else the
    llama-cpp-python package (both in their own process). ``engine`` says which ran."""
    if find_llamacpp()["tools"]["llama-server"]:
        with serving(model, parallel=1, threads=threads, ctx_per_slot=max(512, len(prompt_ids) + n + 8)) as server:
            return dict(complete(server, prompt_ids, n), engine="llama-server")
    out = python_greedy(model, prompt_ids, n, threads=threads)
    return {"tokens": out["greedy"], "engine": "llama-cpp-python", "version": out["version"]}


# llama-cpp-python in a worker process: the prompt's logits, n greedy tokens (argmax of its own logits each
# step) and its tokenization of a text
_PY_WORKER = """
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, ids, n, text = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx, threads = int(sys.argv[5]), int(sys.argv[6])
llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=threads, logits_all=True, verbose=False, seed=0)
llm.reset()
llm.eval(ids)
prompt_logits = np.array(llm.scores[:len(ids)], dtype=np.float32).tolist()
out = []
for _ in range(n):
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(nxt)
    llm.eval([nxt])
tokenized = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else []
print(json.dumps({"version": llama_cpp.__version__, "greedy": out, "prompt_logits": prompt_logits,
                  "tokenized": tokenized}))
"""


def python_greedy(model: PathLike, prompt_ids: Sequence[int], n: int, text: str = "", ctx: int = 256,
                  threads: int = 2) -> dict:
    """llama-cpp-python (the pip package) in its own process: the prompt's logits (a list per position),
    ``n`` greedy tokens and its tokenization of ``text``. RuntimeError (with llama.cpp's last words)
    when the process fails or dies."""
    proc = subprocess.run([sys.executable, "-c", _PY_WORKER, str(model), json.dumps([int(i) for i in prompt_ids]),
                           str(n), text, str(ctx), str(threads)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"llama.cpp could not run {Path(model).name} ({how}): {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
