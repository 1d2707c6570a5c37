"""int8 / int4 quantization: the arithmetic against a direct reference, whole-model closeness
to fp32, safetensors round trips through zenlm.load, size on disk, the CLI and bad input."""
import os

import pytest
import torch

import zenlm
from zenlm.cli import main
from zenlm.quantize import QuantizedLinear, dequantize_weight, quantize_model, quantize_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(preset="tiny", **overrides):
    torch.manual_seed(0)
    return zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(preset, **overrides)).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_quantize_weight_matches_direct_round_to_nearest(bits, group):
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    q, scales = quantize_weight(w, bits, group)
    # reference written out: per row (int8) or per group of columns (int4), scale = max|w| / qmax
    qmax = 2 ** (bits - 1) - 1
    g = group or w.size(1)
    blocks = w.reshape(48, -1, g)
    ref_scale = blocks.abs().amax(-1, keepdim=True) / qmax
    if bits == 4:
        ref_scale = ref_scale.half().float()
    ref = (torch.round(blocks / ref_scale).clamp(-qmax, qmax) * ref_scale).reshape_as(w)
    back = dequantize_weight(q, scales, bits)
    torch.testing.assert_close(back, ref, rtol=0, atol=1e-6)
    # and the rounding error is at most half a step everywhere
    step = ref_scale.expand_as(blocks).reshape_as(w)
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.shape == (48, 64 if bits == 4 else 128)


def test_int4_packing_covers_every_nibble():
    # all 15 representable values in every column position survive pack -> unpack
    values = torch.arange(-7, 8).float()
    w = values.repeat(4, 2)[:, :30]  # 4 rows, 30 columns
    w = torch.cat([w, torch.full((4, 2), 7.0)], 1)
    q, scales = quantize_weight(w, 4, 32)
    torch.testing.assert_close(dequantize_weight(q, scales, 4), w, rtol=0, atol=1e-3)


def test_dynamic_int8_linear_matches_fp32_and_integer_reference(monkeypatch):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 40)
    x = torch.randn(3, 7, 64)
    spec = zenlm.quantize.QuantizationSpec("dynamic")
    ql = QuantizedLinear.from_linear(linear, spec)
    fast = ql(x)
    monkeypatch.setattr(zenlm.quantize, "_fbgemm_available", lambda: False)  # the portable per-token path
    out = ql(x)
    # the same computation done by hand in int64
    flat = x.reshape(-1, 64)
    xs = flat.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(flat / xs).clamp(-127, 127).long()
    acc = xq @ ql.qweight.long().t()
    ref = (acc.double() * xs.double() * ql.scales[:, 0].double() + linear.bias.double()).float().reshape(3, 7, 40)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and close to the float layer: two int8 roundings, each <= 1/254 of the row max
    fp = linear(x).detach()
    assert float((out - fp).norm() / fp.norm()) < 0.02
    # fbgemm's kernel (x86) quantizes the activations per call instead of per token: as close to fp32
    assert float((fast - fp).norm() / fp.norm()) < 0.02


def test_dynamic_int8_tied_head_multiplies_the_integer_table():
    model = quantize_model(_model(), "dynamic")
    table = model.embed_tokens
    hidden = torch.randn(2, 5, table.embedding_dim)
    reference = torch.nn.functional.linear(hidden, table.weight)  # the dequantized table
    with torch.no_grad():
        logits = model.logits(hidden)
    assert float((logits - reference).norm() / reference.norm()) < 0.02
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) > 0.9


@pytest.mark.parametrize("rows", [1, 5, 40])  # the int8 kernel path for few rows, dequantize + GEMM beyond
def test_int8_weight_only_linear_matches_dequantized_reference(rows):
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 48)
    ql = QuantizedLinear.from_linear(linear, zenlm.quantize.QuantizationSpec("int8"))
    x = torch.randn(rows, 64)
    ref = torch.nn.functional.linear(x, dequantize_weight(ql.qweight, ql.scales, 8), linear.bias.detach())
    torch.testing.assert_close(ql(x).detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ql(x[None]).detach()[0], ref, rtol=1e-5, atol=1e-5)  # any leading shape


@pytest.mark.parametrize("scheme,tol,agree", [("int8", 0.05, 0.9), ("dynamic", 0.05, 0.9), ("int4", 0.5, 0.4)])
def test_quantized_model_close_to_fp32(scheme, tol, agree):
    # Tolerances: int8 keeps each weight within 1/254 of its row's max (~1% relative noise per
    # layer for Gaussian weights), so logits move a few percent over 4 layers + embeddings; int4's
    # step is 18x coarser (1/14 of a 64-column group's max), ~10% per layer, so we only ask that
    # the logits stay recognisably the same (relative error < 0.5, top-1 agreement > 40%, random 0.02%).
    model = _model()
    ids = torch.randint(0, 4096, (2, 48))
    with torch.no_grad():
        ref = model(ids).logits
        out = quantize_model(model, scheme)(ids).logits
    assert float((out - ref).norm() / ref.norm()) < tol
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > agree


@pytest.mark.parametrize("preset", ["tiny", "tiny-seq2seq"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "dynamic"])
def test_save_load_round_trip_and_size(tmp_path, preset, scheme):
    model = _model(preset)
    model.save_pretrained(tmp_path / "fp32")
    q = quantize_model(model, scheme)
    q.save_pretrained(tmp_path / "q")
    loaded = zenlm.load(tmp_path / "q")
    assert loaded.config.extra["quantization"]["scheme"] == scheme
    ids = torch.randint(3, 4096, (2, 16))
    args = (ids, ids) if model.config.is_encoder_decoder else (ids,)
    with torch.no_grad():
        assert torch.equal(loaded(*args).logits, q(*args).logits)
    ratio = os.path.getsize(tmp_path / "fp32" / "model.safetensors") / os.path.getsize(tmp_path / "q" / "model.safetensors")
    # norms and biases stay fp32, so the ratio sits a little under the ideal 4x / 8x
    lo, hi = (3.6, 4.05) if scheme != "int4" else (6.8, 8.05)
    assert lo < ratio < hi, ratio
    assert model.embed_tokens.weight.dtype == torch.float32  # the original model is untouched


def test_quantized_model_generates_through_the_kv_cache():
    # the Generator's cached decoding runs on integer weights and matches the quantized model's
    # own full-forward greedy choice at every step
    q = quantize_model(_model(), "int8")
    prompt = [5, 17, 99, 4000, 12]
    out = q.generate(prompt, max_new_tokens=6, eos_token_id=[])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(q(torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(out)[-6:] == ids[-6:]


def test_requantizing_is_a_clear_error(tmp_path):
    q = quantize_model(_model(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(zenlm.load(tmp_path / "q"), "int8")


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize_model(_model(), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(_model(), "int4", group_size=-4)
    with pytest.raises(ValueError, match="group_size must be None"):
        quantize_model(_model(), "dynamic", group_size=32)


def test_cli_quantize(tmp_path, capsys):
    _model().save_pretrained(tmp_path / "fp32")
    assert main(["quantize", str(tmp_path / "fp32"), "--int4", str(tmp_path / "q4")]) == 0
    assert "int4" in capsys.readouterr().out
    assert zenlm.load(tmp_path / "q4").config.extra["quantization"]["group_size"] == 64
    assert main(["quantize", str(tmp_path / "q4"), "--int8", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), "--int8", str(tmp_path / "x")]) == 2
