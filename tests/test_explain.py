"""Interpretability: attention shapes and normalisation for all three families, a copy task
that must learn a diagonal alignment, gradient×input against a finite-difference derivative,
the HTML/PNG report through the CLI, and too-long input."""
import json

import pytest
import torch

import zenlm
from zenlm.cli import main
from zenlm.explain import alignment, attention_maps, explain, gradient_x_input, write_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(enc, dec, **kw):
    base = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_encoder_layers=enc, num_decoder_layers=dec, max_position_embeddings=24)
    return zenlm.TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("enc,dec", [(0, 3), (2, 0), (2, 3)])
def test_attention_shapes_and_rows_sum_to_one(enc, dec):
    torch.manual_seed(0)
    model = zenlm.TransformerLM(_config(enc, dec))
    src = torch.randint(3, 40, (7,))
    tgt = torch.randint(3, 40, (5,))
    maps = attention_maps(model, src, tgt if enc and dec else None)
    main_len = 5 if enc and dec else 7
    layers = dec or enc
    assert maps["attentions"].shape == (layers, 4, main_len, main_len)
    for key, weights in maps.items():
        if weights is None:
            continue
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-5)
        assert bool((weights >= 0).all())
    if dec:  # causal stacks put no weight on future keys
        upper = torch.triu(torch.ones(main_len, main_len, dtype=torch.bool), diagonal=1)
        assert float(maps["attentions"][..., upper].abs().max()) == 0.0
    if enc and dec:
        assert maps["encoder_attentions"].shape == (enc, 4, 7, 7)
        assert maps["cross_attentions"].shape == (dec, 4, 5, 7)
    else:
        assert maps["cross_attentions"] is None


def test_copy_task_learns_a_diagonal_alignment():
    # a 1+1-layer encoder-decoder trained for ~100 steps to copy random 8-token sequences: to emit
    # target token t it must look at source position t, so the cross-attention argmax is the diagonal
    torch.manual_seed(0)
    config = zenlm.TransformerConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                     num_encoder_layers=1, num_decoder_layers=1, max_position_embeddings=16)
    model = zenlm.TransformerLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x = torch.randint(3, 16, (64, 8))
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.1
    hits = 0
    for row in torch.randint(3, 16, (20, 8)):
        a = alignment(model, row, row)
        assert a.shape == (8, 8)
        hits += int((a.argmax(-1) == torch.arange(8)).sum())
    assert hits / 160 >= 0.8


@pytest.mark.parametrize("enc,dec", [(0, 2), (2, 2)])
def test_gradient_x_input_matches_a_finite_difference(enc, dec):
    # attribution_i = e_i · ∂f/∂e_i = d/dα f(α e_i) at α = 1: check it by scaling one embedding
    torch.manual_seed(1)
    model = zenlm.TransformerLM(_config(enc, dec)).double().eval()
    src = torch.randint(3, 40, (1, 6))
    tgt = torch.randint(3, 40, (1, 4)) if enc else None
    attr, src_attr, target = gradient_x_input(model, src, tgt)
    assert attr.shape == ((4,) if enc else (6,))
    assert (src_attr is not None) == bool(enc)

    def logit_with_scaled(position: int, stack_call: int, alpha: float) -> float:
        calls = []

        def hook(_m, _i, out):
            calls.append(None)
            if len(calls) - 1 == stack_call:
                out = out.clone()
                out[0, position] *= alpha
                return out
            return out

        h = model.embed_tokens.register_forward_hook(hook)
        try:
            with torch.no_grad():
                args = (src, tgt) if enc else (src,)
                return float(model(*args).logits[0, -1, target])
        finally:
            h.remove()

    eps = 1e-5
    main_call = 1 if enc else 0
    for i in range(attr.numel()):
        fd = (logit_with_scaled(i, main_call, 1 + eps) - logit_with_scaled(i, main_call, 1 - eps)) / (2 * eps)
        assert abs(fd - float(attr[i])) < 1e-5 * max(1.0, abs(fd))
    if enc:
        fd = (logit_with_scaled(2, 0, 1 + eps) - logit_with_scaled(2, 0, 1 - eps)) / (2 * eps)
        assert abs(fd - float(src_attr[2])) < 1e-5 * max(1.0, abs(fd))


def _tiny_folder(tmp_path, enc, dec):
    tok = zenlm.Tokenizer.train(["the cat sat on the mat", "der hund lief", "hello world"] * 5, kind="char",
                                vocab_size=64)
    torch.manual_seed(0)
    config = _config(enc, dec, vocab_size=tok.vocab_size, num_attention_heads=2, max_position_embeddings=32,
                     pad_token_id=tok.pad_id or 0, bos_token_id=tok.bos_id or 1, eos_token_id=tok.eos_id or 2)
    model = zenlm.TransformerLM(config)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    return tmp_path / "m", model, tok


def test_cli_writes_report_and_rejects_long_text(tmp_path, capsys):
    folder, _, _ = _tiny_folder(tmp_path, 0, 2)
    assert main(["explain", str(folder), "the cat", "--out", str(tmp_path / "report")]) == 0
    assert "predicted next token" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"index.html", "attributions.png", "self-L0-H0.png", "self-L1-H1.png", "explanation.json"} <= files
    page = (tmp_path / "report" / "index.html").read_text()
    assert "self-L1-H1.png" in page and "attributions.png" in page
    assert len(json.loads((tmp_path / "report" / "explanation.json").read_text())["attributions"]) == 7
    assert main(["explain", str(folder), "the cat sat on the mat " * 3, "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "longer than the model's context" in err and "max_position_embeddings=32" in err


def test_translation_report_has_alignment(tmp_path):
    folder, model, tok = _tiny_folder(tmp_path, 1, 1)
    expl = explain(model, tok, "hello world", target="der hund")
    n_src, n_tgt = len(tok.encode("hello world")) + 1, len(tok.encode("der hund")) + 1
    assert len(expl.source_tokens) == n_src and expl.alignment.shape == (n_tgt, n_src)
    torch.testing.assert_close(expl.alignment.sum(-1), torch.ones(n_tgt), rtol=0, atol=1e-5)
    assert expl.source_attributions.shape == (n_src,)
    write_report(expl, tmp_path / "rep")
    assert (tmp_path / "rep" / "alignment.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "cross-L0-H1.png").exists()
    auto = explain(model, tok, "hello")  # no target: the model's own greedy translation is aligned
    assert isinstance(auto.extra["target"], str)
    assert auto.alignment.shape == (len(auto.extra["target_tokens"]), len(tok.encode("hello")) + 1)
    with pytest.raises(ValueError, match="target is .* longer than the model's context"):
        explain(model, tok, "hello", target="der hund lief " * 4)
