"""Shared by the trainer tests: a slice of Tiny Shakespeare, a tiny model, and a run config
small enough to train in a second on one CPU thread."""
import json
from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"num_encoder_layers": 0, "num_decoder_layers": 2, "num_attention_heads": 2, "hidden_size": 32,
              "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def run_config(tmp_path: Path, corpus: Path, **over) -> dict:
    config = {"out_dir": str(tmp_path / "run"), "model": dict(TINY_MODEL), "tokenizer": {"kind": "char"},
              "data": {"train": [str(corpus)], "seq_len": 32, "cache_dir": str(tmp_path / "cache"), "num_workers": 1},
              "optim": {"lr": 3e-3, "warmup_steps": 2}, "max_steps": 12, "batch_size": 4, "eval_interval": 6,
              "eval_batches": 2, "log_interval": 1, "precision": "fp32", "threads": 1, "peak_flops": 1e11,
              "progress": False, "plot": False, "seed": 7}
    for key, value in over.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config


def losses(out_dir: Path) -> list:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
