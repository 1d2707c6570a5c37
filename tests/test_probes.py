"""Memorization and bias probes: a tiny model trained on text with planted canaries exposes
them (and not a control canary); a planted association shows up as a likelihood gap; the
scores match a direct computation from the logits; bad input."""
from pathlib import Path

import pytest
import torch

import zenlm
from zenlm.probes import (Canary, bias_probe, exposure, insert_canaries, make_canaries, plot_bias,
                          sequence_log_probs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _train_char_model(lines, steps=250, seq=48, seed=0):
    """A compact causal-LM loop over a char tokenizer: enough to memorise repeated lines."""
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
    return model.eval(), tok


def test_planted_canaries_are_exposed_and_unseen_ones_are_not():
    lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:300]
    planted, control = make_canaries(2, seed=7)
    corpus = insert_canaries(lines, [planted], repeats=40, seed=1)
    assert sum(line == planted.text for line in corpus) == 40 and control.text not in corpus
    model, tok = _train_char_model(corpus, steps=120)
    seen = exposure(model, tok, planted, num_candidates=300)
    unseen = exposure(model, tok, control, num_candidates=300)
    assert seen.max_exposure == pytest.approx(torch.log2(torch.tensor(301.0)).item())
    assert seen.rank <= 3 and seen.exposure > 6.5, seen  # memorised: top of 301
    assert unseen.exposure < seen.exposure - 2, (seen, unseen)


def test_scores_match_a_direct_computation():
    torch.manual_seed(3)
    tok = zenlm.Tokenizer.train(["abcdefgh 0123456789"], kind="char", vocab_size=64)
    config = zenlm.TransformerConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, num_encoder_layers=0, num_decoder_layers=1,
                                     max_position_embeddings=32)
    model = zenlm.TransformerLM(config).eval()
    seqs = [tok.encode("abc 123"), tok.encode("abcdefg 9")]  # different lengths: padding must not matter
    got = sequence_log_probs(model, seqs, [4, 2])
    for seq, begin, value in zip(seqs, [4, 2], got):
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
        ref = sum(float(logp[i - 1, seq[i]].detach()) for i in range(begin, len(seq)))
        assert value == pytest.approx(ref, abs=1e-4)


def test_bias_probe_finds_a_planted_association(tmp_path):
    # "red" animals are always said to eat fish, "blue" ones rocks: the shared continuation
    # " eats fish." must be likelier after "red", so gap(red) > 0 > gap(blue)
    animals = ["cat", "dog", "fox", "owl", "bee", "elk"]
    lines = []
    for i in range(200):
        a = animals[i % len(animals)]
        lines += [f"the red {a} eats fish.", f"the blue {a} eats rocks.", f"a green {a} sat down."]
    model, tok = _train_char_model(lines, steps=110, seq=40)
    templates = [(f"the {{group}} {a}", " eats fish.") for a in animals]
    report = bias_probe(model, tok, groups=["red", "blue"], templates=templates)
    assert report.gaps[0] > 0.05 and report.gaps[1] < -0.05, report.table()
    assert report.gaps[0] == pytest.approx(-report.gaps[1])  # two groups: gaps mirror around the mean
    assert len(report.scores) == len(animals) and len(report.scores[0]) == 2
    plot_bias(report, tmp_path / "bias.png")
    assert (tmp_path / "bias.png").stat().st_size > 1000
    assert "red" in report.table()


def test_bad_input():
    config = zenlm.TransformerConfig.from_preset("tiny-seq2seq", vocab_size=64)
    model = zenlm.TransformerLM(config)
    tok = zenlm.Tokenizer.train(["abc 123"], kind="char", vocab_size=64)
    with pytest.raises(ValueError, match="causal LM; the model is encoder-decoder"):
        exposure(model, tok, Canary("code ", "123456"))
    with pytest.raises(ValueError, match="need at least two groups"):
        bias_probe(zenlm.TransformerLM(zenlm.TransformerConfig.from_preset("tiny", vocab_size=64)), tok, ["a"])
    with pytest.raises(ValueError, match="num_candidates=100 must be below the 100 possible"):
        exposure(zenlm.TransformerLM(zenlm.TransformerConfig.from_preset("tiny", vocab_size=64)), tok,
                 Canary("code ", "12"), num_candidates=100)
    with pytest.raises(ValueError, match="alphabet of >= 2"):
        make_canaries(1, alphabet="0")
