"""Parity tests run against transformers itself, offline: every model is built locally from a
small config with a fixed seed, saved with save_pretrained and imported by zenlm."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
