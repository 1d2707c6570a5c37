"""zenlm's GGUF tokenizers against llama.cpp's own tokenizer tests, on real vocabularies.

llama.cpp ships, in its ``models/`` folder, vocabulary-only GGUF files of real models
(``ggml-vocab-llama-spm.gguf``: Llama 2's SentencePiece; ``-phi-3``, ``-llama-bpe`` (Llama 3), ``-qwen2``,
``-gpt-2``, ...) with a text suite (``.inp``) and the ids llama.cpp must produce for it (``.out``). For
each file this script:

* reads the vocabulary with zenlm (``zenlm.gguf`` -> a ``Tokenizer``) and counts the texts whose ids
  equal llama.cpp's expected ones (a vocabulary zenlm does not read is a row saying why);
* writes it back with ``export_gguf`` beside a tiny random model and, when llama-cpp-python is
  importable, has llama.cpp tokenize the suite from zenlm's file (in its own process), counting the
  texts whose ids still equal the expected ones.

The folder comes with the llama-cpp-python sdist, which ``scripts/build-llamacpp.sh`` unpacks into its cache
(``llamacpp_peer.find_llamacpp()``); nothing is downloaded here. With no argument the script reads it there:

    bash scripts/build-llamacpp.sh
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_gguf_vocab.py [path/to/vendor/llama.cpp/models]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_WORKER = ("import json, sys\nfrom llama_cpp import Llama\n"
           "llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
           "print(json.dumps([list(llm.tokenize(t.encode(), add_bos=False, special=False)) "
           "for t in json.load(open(sys.argv[2]))]))")


def check(models: Path, out_dir: Path) -> list[dict]:
    import gguf

    from zenlm import TransformerConfig, TransformerLM
    from zenlm.gguf import _tokenizer_from_gguf, export_gguf, read_metadata

    rows = []
    for path in sorted(models.glob("ggml-vocab-*.gguf")):
        inp, out = path.with_name(path.name + ".inp"), path.with_name(path.name + ".out")
        if not (inp.exists() and out.exists()):
            continue
        texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        want = [[int(x) for x in line.split()] for line in out.read_text(encoding="utf-8").split("\n")][:len(texts)]
        meta = read_metadata(gguf.GGUFReader(str(path)))
        row = dict(vocab=path.name[len("ggml-vocab-"):-len(".gguf")], model=meta.get("tokenizer.ggml.model"),
                   pre=meta.get("tokenizer.ggml.pre"), texts=len(texts))
        try:
            tok = _tokenizer_from_gguf(meta)
        except ValueError as e:
            rows.append(dict(row, read=None, note=str(e).split(";")[0]))
            continue
        row["read"] = sum(tok.encode(t) == w for t, w in zip(texts, want))
        row["reexport"] = None
        if importlib.util.find_spec("llama_cpp") is not None:
            n = len(meta["tokenizer.ggml.tokens"])
            model = TransformerLM(TransformerConfig.from_preset(
                "tiny", vocab_size=n, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_decoder_layers=1,
                bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)), pad_token_id=None))
            again = out_dir / path.name
            export_gguf(model, tok, again)
            (out_dir / "texts.json").write_text(json.dumps(texts))
            proc = subprocess.run([sys.executable, "-c", _WORKER, str(again), str(out_dir / "texts.json")],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                row["reexport"] = sum(g == w for g, w in zip(got, want))
            else:
                row["note"] = f"llama.cpp refused zenlm's file: {proc.stderr.strip().splitlines()[-1][:100]}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="?", default=None,
                        help="llama.cpp's models/ folder (ggml-vocab-*.gguf with .inp/.out); default: the one in "
                             "scripts/build-llamacpp.sh's cache")
    args = parser.parse_args(argv)
    if args.models is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from llamacpp_peer import llamacpp_root

        args.models = llamacpp_root() / "src" / "vendor" / "llama.cpp" / "models"
    if not args.models.is_dir():
        print(f"no folder {args.models}")
        return 2
    from zenlm.kernels import system_summary

    print(system_summary().splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        rows = check(args.models, Path(tmp))
    print(f"{'vocabulary':<16} {'model':<6} {'pre':<15} {'zenlm reads':>11} {'llama.cpp on zenlm file':>24}")
    for r in rows:
        read = "refused" if r.get("read") is None else f"{r['read']}/{r['texts']}"
        again = "" if r.get("reexport") is None else f"{r['reexport']}/{r['texts']}"
        print(f"{r['vocab']:<16} {r['model'] or '-':<6} {r['pre'] or '-':<15} {read:>11} {again:>24}"
              + (f"  {r['note']}" if r.get("note") else ""))
    read = [r for r in rows if r.get("read") is not None]
    ok = all(r["read"] == r["texts"] and r.get("reexport") in (None, r["texts"]) for r in read)
    return 0 if ok and read else 1


if __name__ == "__main__":
    sys.exit(main())
