"""Reading Hugging Face folders in their stored dtype: a bf16/fp16 folder stays bf16/fp16 unless
``dtype=`` says otherwise, its logits are transformers' at that precision, fused and transposed
tensors are read part by part, and loading holds about one copy of the weights (peak resident
memory measured in a fresh process)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import zenlm
from zenlm.checkpoint import load_model, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=False)),  # q/k/v bias fused
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2, initializer_range=0.2)),  # Conv1D
}


def _hf_folder(tmp_path, family: str, dtype: torch.dtype):
    """A random model saved in ``dtype``, and transformers' own load of it in ``dtype``."""
    config_name, model_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).to(dtype).save_pretrained(
        tmp_path / family)
    return _reference(tmp_path / family, dtype), tmp_path / family


def _reference(folder, dtype: torch.dtype):
    # from_pretrained, not .to(dtype): that would round the rotary frequencies to the dtype as well
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _ids():
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_folder_stays_bf16_with_transformers_logits(tmp_path, family):
    hf, folder = _hf_folder(tmp_path, family, torch.bfloat16)
    ours = zenlm.load(folder)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids).logits, hf(ids).logits
        exact = _reference(folder, torch.float32)(ids).logits  # the same bf16 weights, computed in fp32
    assert got.dtype == torch.bfloat16
    # both bf16 computations sit within bf16 rounding of the exact one, and of each other
    rounding = (want.float() - exact).abs().max()
    print(family, "zenlm vs transformers bf16:", float((got.float() - want.float()).abs().max()),
          "transformers bf16 vs fp32:", float(rounding))
    assert (got.float() - want.float()).abs().max() <= 2 * rounding + 1e-2 * exact.abs().max(), \
        ((got.float() - want.float()).abs().max(), rounding)
    assert torch.equal(got.argmax(-1), want.argmax(-1)) or (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # generation runs in bf16, through the KV cache, as transformers' greedy search does
    out = ours.generate(ids[:1, :6], max_new_tokens=5)
    assert len(out[0]) == 5 and all(0 <= t < 256 for t in out[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dtype_float32_upcasts_exactly(tmp_path, family):
    _, folder = _hf_folder(tmp_path, family, torch.bfloat16)
    ours = zenlm.load(folder, dtype=torch.float32)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    ids = _ids()
    with torch.no_grad():
        want = _reference(folder, torch.float32)(ids).logits
        got = ours(ids).logits
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # every weight is the stored bf16 value, exactly (fused parts in place, transposes undone)
    kept = zenlm.load(folder)
    for (name, a), b in zip(ours.state_dict().items(), kept.state_dict().values()):
        assert torch.equal(a, b.float()), name


def test_fp16_folder_stays_fp16_and_fp32_folder_stays_fp32(tmp_path):
    _, folder16 = _hf_folder(tmp_path / "16", "qwen2", torch.float16)
    assert {p.dtype for p in zenlm.load(folder16).parameters()} == {torch.float16}
    assert {p.dtype for p in zenlm.load(folder16, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    _, folder32 = _hf_folder(tmp_path / "32", "qwen2", torch.float32)
    assert {p.dtype for p in zenlm.load(folder32).parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype"):
        zenlm.load(folder32, dtype="bfloat16")


def test_zenlm_checkpoints_keep_fp32_and_convert_keeps_fp32(tmp_path):
    model = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset("tiny"))
    save_pretrained(model, tmp_path / "fp32")
    assert {p.dtype for p in load_model(tmp_path / "fp32").parameters()} == {torch.float32}
    half = load_model(tmp_path / "fp32", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    save_pretrained(half, tmp_path / "bf16")
    assert {p.dtype for p in load_model(tmp_path / "bf16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in zenlm.load(tmp_path / "bf16", dtype=torch.float32).parameters()} == {torch.float32}
    # an HF bf16 folder converted into a zenlm checkpoint is fp32 (a starting point for training)
    _, folder = _hf_folder(tmp_path, "llama", torch.bfloat16)
    from zenlm.hf import convert_from_hf

    convert_from_hf(folder, tmp_path / "converted")
    assert {p.dtype for p in load_model(tmp_path / "converted").parameters()} == {torch.float32}


# --------------------------------------------------------------------------- peak memory
# A ~46M-parameter Llama (tied embeddings), random bf16 weights written straight with safetensors.
BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
           vocab_size=32000)

CHILD = textwrap.dedent("""
    import json, sys, torch
    import zenlm

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    torch.set_num_threads(1)
    folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    try:  # reset the high-water mark to the current resident size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status("VmRSS")
    model = zenlm.load(folder, dtype=dtype)
    # touch every weight, so that memory-mapped views count as resident too
    total = sum(float(p.sum()) for p in model.parameters())  # (no fp32 copy of a bf16 tensor)
    print(json.dumps({"base": base, "peak": status("VmHWM"),
                      "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
""")


def _write_big_folder(folder):
    from safetensors.torch import save_file

    c = BIG
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (c["intermediate_size"], h),
                       p + "mlp.up_proj.weight": (c["intermediate_size"], h),
                       p + "mlp.down_proj.weight": (h, c["intermediate_size"]),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **BIG}
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.numel() for t in tensors.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_memory_while_loading_is_about_one_copy(tmp_path, dtype):
    """bf16 kept (fused q|k|v and gate|up built in place) and bf16 -> fp32 (converted piece by piece):
    the peak resident size of a fresh process while loading and touching every weight stays within
    1.3x the weights in the target dtype plus a fixed allowance (allocator slack, scratch buffer)."""
    params = _write_big_folder(tmp_path / "big")
    assert 40e6 < params < 60e6
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), dtype], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["dtypes"] == [f"torch.{dtype}"]
    assert m["weights"] == params * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    # the high-water mark was reset after the imports (where it could not be, this overestimates)
    grown = m["peak"] - m["base"]
    allowance = 64 << 20
    print(dtype, "peak while loading:", grown / m["weights"], "x the weights", m)
    assert grown <= 1.3 * m["weights"] + allowance, (grown / m["weights"], m)
    assert grown >= 0.8 * m["weights"], (grown / m["weights"], m)  # the weights really were touched
