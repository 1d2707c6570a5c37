"""Gemma, Gemma 2 and Gemma 3 through GGUF (zenlm/gguf.py, llama.cpp's gemma/gemma2/gemma3): zenlm ->
GGUF -> zenlm bit-exact at f32 and within q8_0's rounding (the gguf package's own quantizer is the
reference); the file stores each norm as w + 1, as llama.cpp's converter does; transformers' GGUF
reader (gemma2, gemma3) and transformers' GemmaForCausalLM (gemma, which that reader lacks) compute
the same logits on sequences longer than the window; llama.cpp itself (``slow``, when llama_cpp is
importable) decodes the same 32 greedy tokens; what llama.cpp's graphs cannot compute is refused by name."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import zenlm  # noqa: E402
from zenlm import TransformerConfig, TransformerLM, Tokenizer  # noqa: E402
from zenlm.gguf import export_gguf, load_gguf  # noqa: E402
from hf_helpers import perturbed, perturbed_import  # noqa: E402

TEXTS = ["hello world, this is zenlm talking to llama.cpp. " * 20, "numbers 123 4567 and émojis 🦙 über café"]
PROMPT = "hello world, this is zenlm talking to llama.cpp. numbers 123 and 🦙"
# one zenlm config per llama.cpp graph; windows of 8 on sequences of ~40 tokens
GEMMA = dict(norm_unit_offset=True, scale_embedding=True, activation="geglu_tanh", tie_word_embeddings=True)
VARIANTS = {
    "gemma": dict(GEMMA),
    "gemma2": dict(GEMMA, sandwich_norm=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                   query_pre_attn_scalar=16.0, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # a pattern other than llama.cpp's default (5 sliding : 1 global), a local base, linear scaling on the
    # global layers, an untied output
    "gemma3": dict(GEMMA, sandwich_norm=True, qk_norm=True, query_pre_attn_scalar=16.0, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=1e6,
                   rope_local_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                   tie_word_embeddings=False, final_logit_softcap=15.0),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=320)


def tiny(tok, name: str, **overrides) -> TransformerLM:
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_decoder_layers=3, max_position_embeddings=128, **VARIANTS[name])
    kw.update(overrides)
    # off the init (norm weights 0), so that every tensor matters
    return perturbed(TransformerLM, TransformerConfig.from_preset("tiny", **kw), scale=0.1)


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def prompt_ids(tok):
    ids = torch.tensor([tok.encode(TEXTS[0][:150] + TEXTS[1])])
    assert ids.shape[1] > 16  # past the window of 8
    return ids


def fields(c: TransformerConfig) -> dict:
    d = c.to_dict()
    d.pop("extra")
    d.pop("initializer_range")
    return d


@pytest.mark.parametrize("name", list(VARIANTS))
def test_f32_round_trip_is_bit_exact(tok, tmp_path, name):
    model = tiny(tok, name)
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    assert report["architecture"] == name and set(report["tensor_types"]) == {"F32"} and not report["warnings"]
    back = zenlm.load(tmp_path / "m.gguf")
    assert fields(back.config) == fields(model.config)
    ids = prompt_ids(tok)
    assert torch.equal(logits(back, ids), logits(model, ids))
    # the converter's convention: every norm stored as w + 1 (Gemma's RMSNorm scales by 1 + w)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    ours, theirs = model.state_dict(), back.state_dict()
    norms = [n for n in ours if n.endswith("norm.weight")]
    assert len(norms) == 1 + 3 * {"gemma": 2, "gemma2": 4, "gemma3": 6}[name]
    for n in ours:
        if n in norms:
            assert torch.equal(1 + theirs[n], 1 + ours[n])  # (w + 1) - 1 need not be w; 1 + it is
        else:
            assert torch.equal(theirs[n], ours[n]), n
    assert np.array_equal(stored["blk.0.attn_norm.weight"], (ours["decoder.layers.0.attn_norm.weight"] + 1).numpy())
    assert np.array_equal(stored["output_norm.weight"], (ours["decoder.final_norm.weight"] + 1).numpy())
    assert ("output.weight" in stored) == (name == "gemma3")


def test_q8_0_round_trip_is_the_packages_rounding(tok, tmp_path):
    model = tiny(tok, "gemma2")
    report = export_gguf(model, tok, tmp_path / "q.gguf", type="q8_0")
    assert report["tensor_types"]["Q8_0"] == 1 + 3 * 7  # token_embd and each layer's q, k, v, o, gate, up, down
    back = load_gguf(tmp_path / "q.gguf")
    Q = gguf.GGMLQuantizationType.Q8_0
    want, got = model.state_dict(), back.state_dict()
    for n, w in want.items():
        if w.ndim == 2:
            ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q), Q)
            assert np.array_equal(got[n].numpy(), ref), n
        else:
            assert torch.equal(1 + got[n], 1 + w), n
    ids = prompt_ids(tok)
    want = logits(model, ids)
    assert (logits(back, ids) - want).abs().max() < 0.1 * want.abs().max()  # 8-bit weights: a few % off


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_transformers_gguf_reader_gives_the_original_logits(tok, tmp_path, family):
    """A transformers Gemma saved with save_pretrained, imported by zenlm, exported to GGUF: read back by
    transformers' own GGUF reader and by zenlm, it computes the original model's logits. The reader
    takes softcaps, query_pre_attn_scalar and the layer pattern from its config defaults (and llama.cpp
    derives the scalar from head_dim), so the model keeps those: head_dim 256, caps 50/30, pattern 2 / 6."""
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=256, max_position_embeddings=128, sliding_window=8,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gemma2":
        cfg, cls = transformers.Gemma2Config(num_hidden_layers=2, **common), transformers.Gemma2ForCausalLM
    else:
        cfg, cls = transformers.Gemma3TextConfig(num_hidden_layers=6, **common), transformers.Gemma3ForCausalLM
    original, imported = perturbed_import(cls, cfg, tmp_path / "hf")
    assert export_gguf(imported, tok, tmp_path / "m.gguf")["architecture"] == family
    ids = prompt_ids(tok)
    want = logits(original, ids)
    assert want.std() > 1e-2
    assert (logits(load_gguf(tmp_path / "m.gguf"), ids) - want).abs().max() < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert type(hf).__name__ == cls.__name__
    assert (logits(hf, ids) - want).abs().max() < 1e-4


def test_gemma_file_computes_transformers_gemma(tok, tmp_path):
    """Gemma (1): transformers' GGUF reader lacks the architecture, so its GemmaForCausalLM is the
    reference, given the weights the file holds (norms less the converter's + 1)."""
    cfg = transformers.GemmaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh")
    model = tiny(tok, "gemma", num_decoder_layers=2, norm_eps=cfg.rms_norm_eps)
    export_gguf(model, tok, tmp_path / "m.gguf")
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    state = {"model.embed_tokens.weight": stored["token_embd.weight"], "model.norm.weight": stored["output_norm.weight"] - 1}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        for g, h in hf_names.items():
            w = stored[f"blk.{i}.{g}.weight"]
            state[f"model.layers.{i}.{h}.weight"] = w - 1 if g.endswith("norm") else w
    hf = transformers.GemmaForCausalLM(cfg).eval()
    hf.load_state_dict(state, strict=False)  # lm_head is tied to the embeddings
    ids = prompt_ids(tok)
    want = logits(hf, ids)
    assert want.std() > 1e-2
    assert (logits(load_gguf(tmp_path / "m.gguf"), ids) - want).abs().max() < 1e-4


def test_what_llama_cpp_cannot_compute_is_refused_by_name(tok, tmp_path):
    cases = [("gemma2", dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
             ("gemma2", dict(attn_logit_softcap=None), "attn_logit_softcap=None"),
             ("gemma2", dict(query_pre_attn_scalar=24.0), r"query_pre_attn_scalar=24.0 \(llama.cpp uses 16"),
             ("gemma", dict(activation="geglu"), "activation='geglu'"),
             ("gemma3", dict(rope_local_theta=None), "rope_scaling on the sliding layers"),
             ("gemma3", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
              "rope_type='yarn'")]
    for name, overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            export_gguf(tiny(tok, name, **overrides), tok, tmp_path / "x.gguf", arch=name)
    with pytest.raises(ValueError, match="qk_norm=False"):  # a Gemma 2 is no Gemma 3
        export_gguf(tiny(tok, "gemma2"), tok, tmp_path / "x.gguf", arch="gemma3")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_decodes_the_same_greedy_tokens(tok, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source)")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from check_gguf_llamacpp import llamacpp_greedy, zenlm_greedy

    ids = tok.encode(PROMPT)
    assert len(ids) > 16  # past the window
    for name in VARIANTS:
        model = tiny(tok, name)
        export_gguf(model, tok, tmp_path / f"{name}.gguf")
        want, gap, want_logits = zenlm_greedy(model, ids, 32)
        got = llamacpp_greedy(tmp_path / f"{name}.gguf", ids, 32, prompt=PROMPT)
        diff = float(np.abs(got["prompt_logits"] - want_logits).max())
        print(f"{name}: {len(ids)} prompt tokens, window 8: tokens equal {got['tokenized'] == ids}, "
              f"max |dlogit| {diff:.2e}, 32 greedy equal {got['greedy'] == want} (min top-2 gap {gap:.3f})")
        assert got["tokenized"] == ids, name
        assert diff < 1e-2, name
        assert got["greedy"] == want, (name, gap)
