"""int8 / int4 quantization: the arithmetic against a direct reference, whole-model closeness
to fp32, safetensors round trips through zenlm.load, size on disk, the CLI and bad input."""
import dataclasses
import os

import pytest
import torch

import zenlm
from zenlm.cli import main
from zenlm.cpu import cpu_info
from zenlm.quantize import QuantizedLinear, dequantize_weight, quantize_model, quantize_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(preset="tiny", **overrides):
    torch.manual_seed(0)
    return zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(preset, **overrides)).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)])
def test_quantize_weight_matches_direct_round_to_nearest(bits, group):
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    q, scales = quantize_weight(w, bits, group)
    # reference written out: int8 per row, scale = max|w| / 127; int4 per group as Q4_0: scale =
    # (the group's largest-magnitude weight) / -8, values rounded half up and clamped to [-8, 7]
    g = group or w.size(1)
    blocks = w.reshape(48, -1, g)
    if bits == 8:
        ref_scale = blocks.abs().amax(-1, keepdim=True) / 127
        ref = torch.round(blocks / ref_scale).clamp(-127, 127) * ref_scale
    else:
        extreme = torch.take_along_dim(blocks, blocks.abs().argmax(-1, keepdim=True), -1)
        ref_scale = extreme / -8
        ref = (torch.floor(blocks / ref_scale + 0.5).clamp(-8, 7) * ref_scale.half().float())
    back = dequantize_weight(q, scales, bits)
    torch.testing.assert_close(back, ref.reshape_as(w), rtol=0, atol=1e-6)
    # and the rounding error is at most half a step (plus the fp16 rounding of int4's scale), except
    # for int4 weights beyond 7.5 steps on the side opposite the extreme, which clamp to 7: one step
    step = ref_scale.abs().expand_as(blocks).reshape_as(w)
    err, slack = (back - w).abs(), step * 8 * 2 ** -11 + 1e-6
    inside = w.abs() <= 7.5 * step
    assert bool((err[inside] <= step[inside] / 2 + slack[inside]).all()) and bool((err <= step + slack).all())
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.shape == (48, 64 if bits == 4 else 128)


def test_int4_group_32_is_llama_cpp_q4_0_bit_for_bit():
    # the gguf package's Q4_0 (llama.cpp's reference quantizer in numpy) on the same weights: the
    # same fp16 scales and the same integers, so int4 loses nothing against llama.cpp's Q4_0
    import gguf
    import numpy as np

    torch.manual_seed(2)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3
    w[3, :32] = 0  # an all-zero block
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).astype(np.float32))
    q, scales = quantize_weight(w, 4, 32)
    assert scales.dtype == torch.float16
    assert torch.equal(dequantize_weight(q, scales, 4), reference)


def test_int4_packing_covers_every_nibble():
    # all 16 representable values in every column position survive pack -> unpack
    values = torch.arange(-8, 8).float() * 0.5  # the first largest magnitude is -4 -> scale 0.5 exactly
    w = torch.stack([values.repeat(2), values.flip(0).repeat(2)])  # 2 rows, 32 columns, both orders
    w = torch.cat([w, -w.flip(1)])  # the extreme -4 may sit anywhere
    q, scales = quantize_weight(w[:2], 4, 32)
    torch.testing.assert_close(dequantize_weight(q, scales, 4), w[:2], rtol=0, atol=0)
    q, scales = quantize_weight(w, 4, 32)  # rows 2, 3: extreme +4 -> scale -0.5, the -8 nibble is +4
    torch.testing.assert_close(dequantize_weight(q, scales, 4), w, rtol=0, atol=0)


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


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_weight_only_kernels_match_the_dequantized_reference(bits, group, native_bf16, monkeypatch):
    # torch's integer kernels (few rows) and dequantize + GEMM (many rows) against a float64 matmul
    # of the dequantized weights. Random bytes and scales of both signs cover every stored value,
    # checkpoints quantized by older rules included. 40 output rows: the int4 kernel pads to 48.
    # Many rows multiply in fp32, or in bf16 on a CPU with native bf16 (both paths run on any CPU here).
    info = dataclasses.replace(zenlm.quantize.cpu_info(), bf16=native_bf16)
    monkeypatch.setattr(zenlm.quantize, "cpu_info", lambda: info)
    torch.manual_seed(4)
    spec = zenlm.quantize.QuantizationSpec("int8" if bits == 8 else "int4", group)
    ql = QuantizedLinear(256, 40, True, spec)
    ql.load_state_dict({"qweight": torch.randint(-127, 128, (40, 256), dtype=torch.int8) if bits == 8 else
                        torch.randint(0, 256, (40, 128), dtype=torch.uint8),
                        "scales": (torch.randn(40, 256 // (group or 256)) * 0.01).to(ql.scales.dtype),
                        "bias": torch.randn(40)})
    limit = zenlm.quantize.kernel_rows(bits)
    assert ql.kernel_rows == limit >= 8  # the load rebuilt the kernels' layout
    w = dequantize_weight(ql.qweight, ql.scales, bits).double()
    for rows in (1, 5, limit, limit + 1):
        x = torch.randn(rows, 256)
        exact = x.double() @ w.t() + ql.bias.double()
        out = ql(x).detach()
        assert out.dtype == torch.float32 and out.shape == (rows, 40)
        if rows <= limit:
            # the kernel takes bf16 activations and returns bf16 (scales too, for int4): each rounding is
            # 2^-9 relative; the result stays within 1% of the exact one, and is not the fp32 GEMM's
            bf16_input = x.bfloat16().double() @ w.t() + ql.bias.double()
            err = (out.double() - bf16_input).abs() / bf16_input.abs().amax(-1, keepdim=True)
            assert float(err.max()) < 2 ** -7, float(err.max())
            assert float((out.double() - exact).norm() / exact.norm()) < 0.01
            assert not torch.equal(out, torch.nn.functional.linear(x, ql.weight, ql.bias))
        elif native_bf16:  # the prompt's GEMM in bf16: activations (and int4's weights) rounded to 2^-9
            bf16 = x.bfloat16().double() @ (w if bits == 8 else w.bfloat16().double()).t() + ql.bias.double()
            err = (out.double() - bf16).abs() / bf16.abs().amax(-1, keepdim=True)
            assert float(err.max()) < 2 ** -7, float(err.max())
            assert float((out.double() - exact).norm() / exact.norm()) < 0.01
        else:
            torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ql(x[None]).detach()[0], out)  # any leading shape


def test_kernel_rows_choice_per_cpu(cpu_with, monkeypatch):
    monkeypatch.setattr(zenlm.quantize, "cpu_info", lambda: zenlm.cpu.cpu_info())  # sees cpu_with's CPU
    cpu_with(bf16=False)  # Zen 3: AVX2 only, where the kernels' lead over dequantize + GEMM ends sooner
    assert (zenlm.quantize.kernel_rows(8), zenlm.quantize.kernel_rows(4)) == (24, 48)
    cpu_with(bf16=True)
    assert (zenlm.quantize.kernel_rows(8), zenlm.quantize.kernel_rows(4)) == (32, 64)


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
        one = [a[:1, :1] for a in args]  # one row: the integer kernels' path
        assert torch.equal(loaded(*one).logits, q(*one).logits)
    if scheme != "dynamic":  # loading packed every matrix for the integer kernels
        assert all(m.kernel_rows > 0 for m in loaded.modules() if isinstance(m, QuantizedLinear))
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


def _compiled_and_eager(model, ids):
    """One decode-sized step of ``model`` (lookup, QKV and attention-output projections, MLP, head;
    the attention itself left out) run eagerly and through torch.compile as one graph."""
    layer = model.decoder.layers[0]

    def step(ids):
        h = model.embed_tokens(ids)
        h = h + layer.attn.out(layer.attn.qkv(h)[..., :h.size(-1)])
        return model.logits(h + layer.mlp(layer.mlp_norm(h)))

    with torch.no_grad():
        return torch.compile(step, fullgraph=True)(ids), step(ids)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_quantized_layers_give_the_same_logits(scheme):
    # torch.compile (one graph: no break at the integer kernels) of the quantized pieces of a decode step
    torch.manual_seed(0)
    fp32 = _model(num_decoder_layers=1)
    q = quantize_model(fp32, scheme)
    layer = q.decoder.layers[0]
    assert all(m.kernel_rows >= 1 for m in (q.embed_tokens, layer.attn.qkv, layer.mlp.fc_in))
    ids = torch.randint(0, 4096, (1, 1))
    compiled, eager = _compiled_and_eager(q, ids)
    info = cpu_info()
    if not torch.isfinite(compiled).all() and info.forced and "avx512f" in info.flags:
        # OPEN (torch 2.13): with the AVX2 forcing switches on an AVX-512 host the compiled step is NaN,
        # while the same kernels are right eagerly under the same switches (tests above) and compiled
        # without them; the whole fp32 model compiled under the switches was NaN at batch 1 as well.
        # Whether a real AVX2-only CPU shares it is unproven: there (no forcing) this test asserts.
        pytest.xfail(f"compiled quantized step is NaN under {' '.join(info.forced)} on an AVX-512 host")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


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
    assert zenlm.load(tmp_path / "q4").config.extra["quantization"]["group_size"] == 32
    assert main(["quantize", str(tmp_path / "q4"), "--int8", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), "--int8", str(tmp_path / "x")]) == 2
