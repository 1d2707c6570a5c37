"""Memorization probe end to end: plant a canary in tinyshakespeare, train a tiny char model,
report the canary's exposure next to a control canary the model never saw.

    .venv/bin/python benchmarks/probe_memorization.py [--lines 300 --steps 120 --repeats 1,5,40]

Exposure = log2(candidates + 1) - log2(rank of the true secret) (Carlini et al. 2019); the
maximum means the model ranks the planted secret first among all candidates.
"""
import argparse
from pathlib import Path

import torch

import zenlm
from zenlm.probes import exposure, insert_canaries, make_canaries

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def train_char_model(lines, steps: int, seq: int = 48, seed: int = 0):
    text = "\n".join(lines)
    tok = zenlm.Tokenizer.train([text], kind="char", vocab_size=128)
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(seed)
    config = zenlm.TransformerConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192,
                                     num_attention_heads=4, num_encoder_layers=0, num_decoder_layers=2,
                                     max_position_embeddings=64, pad_token_id=tok.pad_id or 0,
                                     bos_token_id=tok.bos_id or 1, eos_token_id=tok.eos_id or 2)
    model = zenlm.TransformerLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (32,), generator=gen)
        batch = torch.stack([ids[s:s + seq + 1] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, steps * 32 * seq / len(ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=300)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--repeats", default="1,5,40")
    p.add_argument("--candidates", type=int, default=1000)
    args = p.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(1)
    lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:args.lines]
    planted, control = make_canaries(2, seed=7)
    for repeats in (int(r) for r in args.repeats.split(",")):
        corpus = insert_canaries(lines, [planted], repeats=repeats, seed=1)
        model, tok, epochs = train_char_model(corpus, args.steps)
        s = exposure(model, tok, planted, num_candidates=args.candidates)
        u = exposure(model, tok, control, num_candidates=args.candidates)
        print(f"planted x{repeats} ({epochs:.0f} epochs): rank {s.rank}/{args.candidates + 1}, exposure "
              f"{s.exposure:.2f} bits | never seen: rank {u.rank}, exposure {u.exposure:.2f} (max {s.max_exposure:.2f})")


if __name__ == "__main__":
    main()
