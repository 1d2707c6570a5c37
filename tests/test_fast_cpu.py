"""zenlm.fast_cpu(): the oneDNN route for fp32 Linear layers must match the plain F.linear path."""
import pytest
import torch
import torch.nn.functional as F

import zenlm
from zenlm import TransformerConfig, TransformerLM
from zenlm.kernels import linear
from zenlm.model import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def fast():
    # the oneDNN route itself, whatever this CPU's calibration chose for fp32 Linear layers
    assert zenlm.fast_cpu(fp32_linear="onednn") is True
    yield
    zenlm.fast_cpu(False)


def _grads(fn, *tensors):
    out = fn(*tensors)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    grads = [t.grad.clone() for t in tensors if t is not None and t.requires_grad]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_forward_and_backward(fast, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    out_fast, grads_fast = _grads(linear, x, w, b)
    zenlm.fast_cpu(False)
    out_plain, grads_plain = _grads(F.linear, x, w, b)
    torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=1e-5)
    assert len(grads_fast) == len(grads_plain) == (3 if bias else 2)
    for a, b_ in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-5)


def test_fast_path_is_really_taken_and_off_by_default():
    assert zenlm.fast_cpu(False) is False
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    try:
        torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(1) or original(*a)
        layer(x)
        assert calls == []  # default: F.linear
        zenlm.fast_cpu(fp32_linear="onednn")
        layer(x)
        assert calls == [1]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its own (bf16) path
            assert layer(x).dtype == torch.bfloat16
        assert calls == [1]
        layer.double()(x.double())  # fp64: plain path
        assert calls == [1]
    finally:
        torch.ops.mkldnn._linear_pointwise = original
        zenlm.fast_cpu(False)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-seq2seq", {"pre_norm": False, "embedding_norm": True, "final_norm": False, "lm_head_bias": True,
                      "position_offset": 2}),
    ("tiny", {"tie_word_embeddings": False}),
])
def test_model_loss_logits_and_grads_match_plain_path(preset, overrides):
    torch.manual_seed(0)
    config = TransformerConfig.from_preset(preset, **overrides)
    model = TransformerLM(config)
    ids = torch.randint(3, config.vocab_size, (2, 12))
    labels = torch.randint(3, config.vocab_size, (2, 12))

    def run():
        out = model(ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.logits.detach(), out.loss.detach(), grads

    zenlm.fast_cpu(False)
    logits_plain, loss_plain, grads_plain = run()
    zenlm.fast_cpu(fp32_linear="onednn")
    try:
        logits_fast, loss_fast, grads_fast = run()
    finally:
        zenlm.fast_cpu(False)
    torch.testing.assert_close(logits_fast, logits_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=0, atol=1e-5)
    assert grads_fast.keys() == grads_plain.keys() and len(grads_plain) == len(list(model.parameters()))
    for name in grads_plain:
        torch.testing.assert_close(grads_fast[name], grads_plain[name], rtol=0, atol=1e-5, msg=name)


def test_state_dict_keys_unchanged_by_linear_subclass():
    config = TransformerConfig.from_preset("tiny-seq2seq")
    keys = set(TransformerLM(config).state_dict())
    assert "encoder.layers.0.attn.qkv.weight" in keys and "decoder.layers.0.cross_attn.kv.bias" in keys
    assert all(isinstance(m, torch.nn.Linear) for n, m in TransformerLM(config).named_modules() if n.endswith("qkv"))


def test_bf16_inference_weight_cache_matches_autocast_and_follows_updates():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        zenlm.fast_cpu()
        try:
            cached = layer(x)
            assert hasattr(layer.weight, "_zenlm_bf16")
            layer.weight.mul_(2)  # an in-place update must invalidate the cached bf16 copy
            updated = layer(x)
        finally:
            zenlm.fast_cpu(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh context: autocast's own cache
        expected = layer(x)
    assert cached.dtype == updated.dtype == torch.bfloat16
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    torch.testing.assert_close(updated, expected, rtol=0, atol=0)
    assert not torch.equal(updated, cached)


@pytest.mark.parametrize("case,length", [("causal", 24), ("causal", 300), ("padding", 24), ("none", 24)])
def test_bf16_attention_path_matches_fp32_sdpa(fast, case, length):
    """fast_cpu()'s bf16 CPU attention (two bmm + fp32 softmax) against fp32 SDPA: bf16-level error only.
    A causal square of >= 256 positions goes through query blocks that skip the keys they may not see."""
    from zenlm.model import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 16) for _ in range(3))
    mask = None
    if case == "padding":
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., 17:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")
    out, weights = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, case == "causal")
    assert out.dtype == torch.bfloat16 and weights is None
    err = (out.float() - ref).abs().max().item()
    assert err < 0.03, err
    # a masked key must carry no weight: changing it leaves the output unchanged
    if case != "none":
        v2 = v.clone()
        v2[1, :, -1] += 100.0
        out2, _ = attention(q.bfloat16(), k.bfloat16(), v2.bfloat16(), mask, case == "causal")
        assert torch.equal(out2[1, :, :-1] if case == "causal" else out2[1], out[1, :, :-1] if case == "causal" else out[1])


def test_fp32_linear_library_is_the_one_that_measured_faster_and_is_remembered(tmp_path, monkeypatch):
    """fast_cpu() takes MKL or oneDNN for fp32 Linear layers by timing both on this CPU once:
    oneDNN only when it wins by 3% (Zen 4/5), torch's MKL otherwise (Zen 3); cached on disk."""
    from zenlm import kernels as m

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ZENLM_FP32_LINEAR", raising=False)
    calls = []
    for times, expected in (({"mkl": 1.0, "onednn": 0.9}, "onednn"), ({"mkl": 1.0, "onednn": 0.99}, "mkl"),
                            ({"mkl": 0.8, "onednn": 1.0}, "mkl")):
        monkeypatch.setattr(m, "_BACKEND", {})
        (tmp_path / "zenlm" / "kernels.json").unlink(missing_ok=True)
        monkeypatch.setattr(m, "calibrate_fp32_linear", lambda times=times: calls.append(1) or times)
        assert m.fp32_linear_backend() == expected
        assert zenlm.fast_cpu() and m._FAST_CPU["onednn"] is (expected == "onednn")
        zenlm.fast_cpu(False)
        monkeypatch.setattr(m, "_BACKEND", {})  # a new process reads the choice back without timing again
        assert m.fp32_linear_backend() == expected
    assert len(calls) == 3
    saved = (tmp_path / "zenlm" / "kernels.json").read_text()
    assert "threads" in saved and "seconds" in saved
    monkeypatch.setenv("ZENLM_FP32_LINEAR", "onednn")
    assert m.fp32_linear_backend() == "onednn"
    monkeypatch.setenv("ZENLM_FP32_LINEAR", "blas")
    with pytest.raises(ValueError, match="ZENLM_FP32_LINEAR.*blas"):
        m.fp32_linear_backend()
    with pytest.raises(ValueError, match="fp32_linear.*cublas"):
        zenlm.fast_cpu(fp32_linear="cublas")


def test_calibration_times_both_libraries():
    from zenlm.kernels import calibrate_fp32_linear

    times = calibrate_fp32_linear(rows=16, d=32, reps=2)
    assert set(times) == {"mkl", "onednn"} and all(0 < t < 1 for t in times.values())
