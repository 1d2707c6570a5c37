"""GGUF out and in (zenlm/gguf.py): zenlm -> GGUF -> zenlm at f32 (bit-exact), f16 and q8_0 (within
their rounding, against a reference dequantization written here); the tokenizer and chat template
round trip; the file holds what llama.cpp's converter writes for a Llama (names and shapes from the
gguf package's own HF -> GGUF name map, the converter's q/k permutation, its hyper-parameter keys);
transformers' independent GGUF reader gives the same logits; q4_0/q4_K read through gguf.quants;
bad input is a ValueError naming what is wrong. The llama.cpp checks themselves are ``slow`` (they need
llama-cpp-python, a ~20-minute build): every exported family's f32 greedy tokens, and q8_0's against
zenlm's reading of the same file; benchmarks/check_gguf_llamacpp.py does the same by hand."""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import zenlm  # noqa: E402
from zenlm import TransformerConfig, TransformerLM, Tokenizer  # noqa: E402
from zenlm.gguf import ARCHS, export_gguf, inspect_gguf, load_gguf, permute, unpermute  # noqa: E402
from zenlm.tokenizer import SPECIAL_TOKENS  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "hf"))
from hf_helpers import perturbed, perturbed_import  # noqa: E402

TEXTS = ["hello world, this is zenlm talking to llama.cpp. " * 20, "numbers 123 4567 and émojis 🦙 über café",
         "def f(x):\n    return x * 2\n\n# tabs\tand  spaces"]
SAMPLE = "hello world 🦙 123 4567, café über\n\tdef f(x): return x  * 2 <|user|>hi<|end|>"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=320)


def tiny(tok, seed=0, **overrides) -> TransformerLM:
    """A small random decoder; weights nudged off their init so that every tensor matters."""
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_decoder_layers=2, max_position_embeddings=128, tie_word_embeddings=False)
    kw.update(overrides)
    return perturbed(TransformerLM, TransformerConfig.from_preset("tiny", **kw), seed=seed)


def ids_of(tok, text=TEXTS[0][:120] + TEXTS[1]):
    return torch.tensor([tok.encode(text)])


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def config_fields(c: TransformerConfig) -> dict:
    d = c.to_dict()
    d.pop("extra")
    d.pop("initializer_range")
    return d


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("overrides, arch", [
    ({}, "llama"),
    ({"tie_word_embeddings": True}, "llama"),
    ({"bias": True}, "llama"),
    ({"rope_scaling": LLAMA3_ROPE}, "llama"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "llama"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, "llama"),
    ({"qkv_bias": True}, "qwen2"),
    ({"qk_norm": True, "head_size": 32}, "qwen3"),
])
def test_f32_round_trip_is_bit_exact(tok, tmp_path, overrides, arch):
    model = tiny(tok, **overrides)
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    assert report["architecture"] == arch and report["tensor_types"] == {"F32": report["tensor_types"]["F32"]}
    back = zenlm.load(tmp_path / "m.gguf")  # the .gguf dispatch in zenlm.load
    assert config_fields(back.config) == config_fields(model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids = ids_of(tok)
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_f16_round_trip_within_fp16_rounding(tok, tmp_path):
    model = tiny(tok)
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="f16")
    assert report["tensor_types"] == {"F16": 1 + 7 * 2 + 1, "F32": 2 * 2 + 1}  # matrices f16, norms f32
    back = load_gguf(tmp_path / "m.gguf")
    rounded = {n: (t.half().float() if t.dim() >= 2 else t) for n, t in model.state_dict().items()}
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, rounded[name]), name
    reference = tiny(tok)
    reference.load_state_dict(rounded)
    ids = ids_of(tok)
    assert torch.equal(logits(back, ids), logits(reference, ids))
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 2e-3


def q8_0_reference(w: np.ndarray) -> np.ndarray:
    """Q8_0 written out (ggml's quantize_row_q8_0_ref): blocks of 32 along a row, scale
    d = max|x| / 127 kept as f16, q = round(x / d) in int8; the value read back is q * d."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inv
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)  # round half away from zero
    return (q.astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_q8_0_round_trip_within_its_rounding(tok, tmp_path):
    model = tiny(tok)
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="q8_0")
    assert report["tensor_types"] == {"Q8_0": 16, "F32": 5}
    back = load_gguf(tmp_path / "m.gguf")
    reference_state = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() < 2:
            reference_state[name] = tensor
            continue
        ref = torch.from_numpy(q8_0_reference(tensor.numpy()))
        got = back.state_dict()[name]
        assert torch.equal(got, ref), name
        # and the rounding is what Q8_0 promises: half a step of its block's scale, plus the scale's own
        # f16 rounding (relative 2^-11) times at most 127 steps
        step = tensor.abs().reshape(-1, 32).max(dim=1).values / 127
        assert ((got - tensor).abs().reshape(-1, 32) <= step[:, None] * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name
        reference_state[name] = ref
    reference = tiny(tok)
    reference.load_state_dict(reference_state)
    ids = ids_of(tok)
    assert torch.equal(logits(back, ids), logits(reference, ids))
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 5e-2


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tok, tmp_path):
    model = tiny(tok, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="q8_0")
    assert report["tensor_types"]["F16"] > 0  # rows of 48 are not whole Q8_0 blocks (llama.cpp's converter does the same)
    back = load_gguf(tmp_path / "m.gguf")
    ids = ids_of(tok)
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 5e-2


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_ids_text_specials_and_chat_template(tok, tmp_path):
    chat_tok = Tokenizer(tok.backend, chat_template=CHAT, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    export_gguf(tiny(tok), chat_tok, tmp_path / "m.gguf")
    back = load_gguf(tmp_path / "m.gguf").tokenizer
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    assert back.decode(tok.encode(SAMPLE)) == tok.decode(tok.encode(SAMPLE))
    assert back.vocab_size == tok.vocab_size
    for i in range(9):  # zenlm's special tokens keep their ids and stay special
        assert back.id_to_token(i) == tok.id_to_token(i)
        assert back.encode(tok.id_to_token(i)) == [i]
    assert back.chat_template == CHAT
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert back.render_chat(messages) == chat_tok.render_chat(messages)
    assert back.special_tokens["bos_token"] == "<s>" and back.special_tokens["eos_token"] == "</s>"
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == CHAT
    assert meta["tokenizer.ggml.token_type"][:9] == [3] * 9  # CONTROL, as the converter marks special added tokens
    assert meta["tokenizer.ggml.token_type"][9:] == [1] * (tok.vocab_size - 9)
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|end|>")  # zenlm's turns end there


def test_named_chat_templates_round_trip(tok, tmp_path):
    templates = {"default": CHAT, "tool_use": CHAT.replace("<|end|>", "<|end|>\n")}
    export_gguf(tiny(tok), Tokenizer(tok.backend, chat_template=templates), tmp_path / "m.gguf")
    assert load_gguf(tmp_path / "m.gguf").tokenizer.chat_template == templates


def test_llama3_style_tokenizer_round_trips(tmp_path):
    """A Split(regex) + ByteLevel pre-tokenizer (Llama 3's) is written as pre 'llama-bpe' and read back."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Rust

    from zenlm.gguf import PRE_TOKENIZERS

    rust = Rust(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    llama3_tok = Tokenizer(rust)
    model = tiny(llama3_tok)
    export_gguf(model, llama3_tok, tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()}
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    back = load_gguf(tmp_path / "m.gguf").tokenizer
    text = SAMPLE + " 1234567 it's WE'LL"
    assert back.encode(text) == llama3_tok.encode(text)


# --------------------------------------------------------------------------- what llama.cpp's converter writes
def converter_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py, LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_file_has_the_converters_names_shapes_keys_and_permutation(tok, tmp_path, tied):
    from safetensors.torch import load_file

    from zenlm.hf import save_hf

    model = tiny(tok, tie_word_embeddings=tied)
    c = model.config
    save_hf(model, tmp_path / "hf")  # the Hugging Face Llama folder the converter would read
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_decoder_layers)
    expected = {}
    for hf_name, tensor in hf.items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        if hf_name.endswith("q_proj.weight"):
            tensor = converter_permute(tensor, c.num_attention_heads, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = converter_permute(tensor, c.num_attention_heads, c.num_key_value_heads)
        expected[gguf_name] = tensor

    export_gguf(model, tok, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    assert ("output.weight" in got) is not tied
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
            "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
            "blk.0.ffn_down.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(got)
    for name, tensor in expected.items():
        assert tuple(got[name].shape) == tuple(reversed(tensor.shape)), name  # GGUF lists ne0 (columns) first
        assert np.array_equal(np.asarray(got[name].data).reshape(tensor.shape), tensor.numpy()), name

    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected_keys = {"llama.block_count": c.num_decoder_layers, "llama.context_length": c.max_position_embeddings,
                     "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
                     "llama.attention.head_count": c.num_attention_heads,
                     "llama.attention.head_count_kv": c.num_key_value_heads,
                     "llama.rope.dimension_count": c.head_dim, "llama.vocab_size": c.vocab_size,
                     "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_id}
    for key, value in expected_keys.items():
        assert meta[key] == value, key
    assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    assert len(meta["tokenizer.ggml.tokens"]) == c.vocab_size
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1


def test_permute_is_the_converters_and_unpermute_undoes_it():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(permute(w, 4), converter_permute(w, 4, 4))
    assert torch.equal(permute(w[:16], 2), converter_permute(w[:16], 4, 2))
    assert torch.equal(unpermute(permute(w, 4), 4), w)


def test_llama3_rope_writes_the_converters_rope_freqs(tok, tmp_path):
    import math

    model = tiny(tok, rope_scaling=LLAMA3_ROPE)
    export_gguf(model, tok, tmp_path / "m.gguf")
    got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["rope_freqs.weight"]
    dim, base = model.config.head_dim, model.config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    want = []
    for freq in freqs:  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < 64 / 4.0:
            want.append(1)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert np.array_equal(np.asarray(got.data), np.array(want, dtype=np.float32))


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"qkv_bias": True}])
def test_transformers_gguf_reader_gives_the_same_logits(tok, tmp_path, overrides):
    """transformers reads llama.cpp's files on its own (integrations/ggml.py: the converter's
    permutation undone, its key names): a second, independent consumer of what we write."""
    transformers = pytest.importorskip("transformers")
    model = tiny(tok, **overrides)
    export_gguf(model, tok, tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = ids_of(tok)
    assert (logits(hf, ids) - logits(model, ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == tok.encode(SAMPLE)


# --------------------------------------------------------------------------- other tensor types in
def rewrite(src, dst, convert, drop=()):
    """Copy a GGUF file, every key as it is (but those in ``drop``), each tensor through
    ``convert(name, float32 array)`` -> (array, raw_dtype or None)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
        array, raw = convert(t.name, data)
        writer.add_tensor(t.name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_q4_0_and_q4_K_files_read_through_the_packages_dequantizers(tok, tmp_path):
    Q = gguf.GGMLQuantizationType
    model = tiny(tok, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    export_gguf(model, tok, tmp_path / "f32.gguf")
    raw_q4k = {}
    rng = np.random.default_rng(0)

    def convert(name, data):
        if name.endswith("ffn_down.weight"):  # Q4_K: random blocks (the package has no Q4_K quantizer)
            rows, cols = data.shape
            blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
            blocks[..., 0:2] = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)  # d
            blocks[..., 2:4] = np.frombuffer(np.float16(5e-4).tobytes(), dtype=np.uint8)  # dmin
            raw_q4k[name] = blocks.reshape(rows, -1)
            return raw_q4k[name], Q.Q4_K
        if data.ndim == 2:
            return gguf.quants.quantize(data, Q.Q4_0), Q.Q4_0
        return data, None

    rewrite(tmp_path / "f32.gguf", tmp_path / "q4.gguf", convert)
    types = {name: kind for name, _, kind in inspect_gguf(tmp_path / "q4.gguf")["tensors"]}
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q4_0"
    back = load_gguf(tmp_path / "q4.gguf")
    state = back.state_dict()
    for i in range(2):
        want = gguf.quants.dequantize(raw_q4k[f"blk.{i}.ffn_down.weight"], Q.Q4_K)
        assert np.array_equal(state[f"decoder.layers.{i}.mlp.fc_out.weight"].numpy(), want)
        v = model.state_dict()[f"decoder.layers.{i}.attn.qkv.weight"][-128:].numpy()
        want_v = gguf.quants.dequantize(gguf.quants.quantize(v, Q.Q4_0), Q.Q4_0)
        assert np.array_equal(state[f"decoder.layers.{i}.attn.qkv.weight"][-128:].numpy(), want_v)
        assert np.abs(want_v - v).max() < np.abs(v).max() / 7  # 4-bit: within a step of the block scale


# --------------------------------------------------------------------------- bad input
def test_a_model_that_does_not_map_is_a_value_error_naming_it(tok, tmp_path):
    gpt2_like = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                                num_attention_heads=2, num_encoder_layers=0, num_decoder_layers=1,
                                                max_position_embeddings=64, activation="gelu_tanh"))
    with pytest.raises(ValueError, match=r"norm='layernorm'.*position='learned'"):
        export_gguf(gpt2_like, tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="attn_logit_softcap=30"):
        export_gguf(tiny(tok, attn_logit_softcap=30.0), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        export_gguf(tiny(tok, rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                            "original_max_position_embeddings": 64}), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="sliding_window=16"):
        export_gguf(tiny(tok, sliding_window=16), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_0'"):
        export_gguf(tiny(tok), tok, tmp_path / "x.gguf", type="q4_0")
    char = Tokenizer.train(TEXTS, vocab_size=tok.vocab_size, kind="char")
    with pytest.raises(ValueError, match="WordLevel"):
        export_gguf(tiny(char, vocab_size=char.vocab_size), char, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="carries the tokenizer"):
        export_gguf(tiny(tok), None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_an_unsupported_architecture_or_tensor_type_is_a_value_error_naming_it(tok, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3, phi3"):
        zenlm.load(tmp_path / "gpt2.gguf")

    export_gguf(tiny(tok), tok, tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "i8.gguf",
            lambda name, data: ((data * 100).astype(np.int8), None) if name == "blk.1.attn_q.weight" else (data, None))
    with pytest.raises(ValueError, match=r"'blk.1.attn_q.weight' has type I8"):
        load_gguf(tmp_path / "i8.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "iq.gguf",
            lambda name, data: (np.zeros((data.shape[0], data.shape[1] // 32 * 18), dtype=np.uint8),
                                gguf.GGMLQuantizationType.IQ4_NL) if name == "blk.0.ffn_up.weight" else (data, None))
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has type IQ4_NL"):
        load_gguf(tmp_path / "iq.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


def test_architectures_are_one_table():
    assert set(ARCHS) == {"llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"}
    assert ARCHS["llama"].interleaved_rope and not ARCHS["qwen2"].interleaved_rope


def test_loaded_model_generates_like_the_original(tok, tmp_path):
    model = tiny(tok)
    export_gguf(model, tok, tmp_path / "m.gguf")
    back = zenlm.load(str(tmp_path / "m.gguf"))
    prompt = "hello world"
    assert back.generate(prompt, max_new_tokens=12) == model.generate(prompt, tokenizer=tok, max_new_tokens=12)


# --------------------------------------------------------------------------- the real consumer
@pytest.mark.slow
def test_llama_cpp_loads_the_file_and_its_greedy_tokens_equal_zenlms(tok, tmp_path):
    check = _llama_cpp_check()
    result = check(tmp_path, tokens=32)  # every variant: llama (4 ropes, tied, bias), qwen2, qwen3, phi3 partial rotary
    assert not [r for r in result["rows"] if r.get("error")], result
    assert result["tokenizer_equal"], result
    assert result["greedy_equal"], result


@pytest.mark.slow
def test_llama_cpp_q8_0_greedy_tokens_equal_zenlms_reading_of_the_same_file(tok, tmp_path):
    """llama.cpp multiplies the q8_0 weights by activations it rounds to 8 bits too, zenlm by its exact
    activations: both read prompt + zenlm's 32 greedy tokens, and llama.cpp's logits stay within that
    rounding (measured 0.06-0.09 here; a wrong scale, block order or permutation is > 1) and its argmax is
    zenlm's token at >= 30 of the 32 steps (a near-tie may fall the other way)."""
    check = _llama_cpp_check()
    result = check(tmp_path, tokens=32, types=("q8_0",), variants=("llama", "qwen2", "qwen3", "phi3-partial"))
    crashed = [r for r in result["rows"] if r.get("error")]
    assert not crashed, ("llama.cpp died on a q8_0 file; a build with ggml's AMX path (pip's default -march=native "
                         "on Sapphire Rapids) does: pip install \"$(bash scripts/build-llamacpp.sh --wheel)\"", crashed)
    assert result["tokenizer_equal"], result
    for row in result["rows"]:
        assert row["path_logits_max_diff"] < 0.15, row
        assert row["path_agree"] >= 30, row


def _llama_cpp_check():
    """benchmarks/check_gguf_llamacpp.check, where llama_cpp is importable."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source, "
                    "~20 minutes on 2 cores), then run this test or benchmarks/check_gguf_llamacpp.py")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from check_gguf_llamacpp import check

    return check


def test_a_name_llama_cpp_would_take_for_phi3s_is_rewritten_when_the_vocabulary_lacks_phi3s_tokens(tok, tmp_path):
    """llama.cpp's vocabulary loader looks Phi-3's tokens up in any file whose general.name says phi3
    and aborts without them: export writes such a name as phi_3 and says so."""
    report = export_gguf(tiny(tok, partial_rotary_factor=0.5), tok, tmp_path / "my-phi3-model.gguf")
    name = gguf.GGUFReader(tmp_path / "my-phi3-model.gguf").get_field("general.name").contents()
    assert name == "my-phi_3-model" and any("<|endoftext|>" in w for w in report["warnings"]), (name, report)
    phi_vocab = Tokenizer.train(TEXTS, vocab_size=320, special_tokens=[*SPECIAL_TOKENS, "<|endoftext|>"])
    export_gguf(tiny(phi_vocab), phi_vocab, tmp_path / "phi-3.gguf")  # Phi-3's tokens there: the name stays
    assert gguf.GGUFReader(tmp_path / "phi-3.gguf").get_field("general.name").contents() == "phi-3"


# --------------------------------------------------------------------------- more families
def test_phi3_partial_rotary_round_trips_and_reads_in_transformers(tok, tmp_path):
    partial = tiny(tok, partial_rotary_factor=0.5)
    assert export_gguf(partial, tok, tmp_path / "p.gguf")["architecture"] == "phi3"
    names = {n for n, _, _ in inspect_gguf(tmp_path / "p.gguf")["tensors"]}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.attn_q.weight" not in names
    back = load_gguf(tmp_path / "p.gguf")
    assert back.config.partial_rotary_factor == 0.5
    ids = ids_of(tok)
    assert torch.equal(logits(back, ids), logits(partial, ids))
    # transformers' phi3 GGUF reader has no partial rotary: check its fused names on a full-rotary model
    transformers = pytest.importorskip("transformers")
    full = tiny(tok)
    export_gguf(full, tok, tmp_path / "m.gguf", arch="phi3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert (logits(hf, ids) - logits(full, ids)).abs().max() < 1e-4


def test_sliding_window_export_is_explicit(tok, tmp_path):
    model = tiny(tok, sliding_window=16)
    report = export_gguf(model, tok, tmp_path / "m.gguf", ignore_sliding_window=True)
    assert report["architecture"] == "llama"
    back = load_gguf(tmp_path / "m.gguf")
    ids = ids_of(tok)[:, :16]  # within the window the two models are the same
    assert torch.equal(logits(back, ids), logits(model, ids))
    with pytest.raises(ValueError, match="unknown GGUF architecture 'mamba'"):
        export_gguf(model, tok, tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(ValueError, match="qk_norm=False"):
        export_gguf(tiny(tok), tok, tmp_path / "m.gguf", arch="qwen3")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hugging_face_model_through_zenlm_to_gguf_keeps_transformers_logits(tok, tmp_path, family):
    """A transformers model saved with save_pretrained, imported by zenlm, exported to GGUF: the
    GGUF read back (by zenlm, and by transformers where its reader knows the architecture) computes
    the original transformers model's logits."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(head_dim=32, **common), transformers.Qwen3ForCausalLM
    original, imported = perturbed_import(cls, cfg, tmp_path / "hf")
    assert export_gguf(imported, tok, tmp_path / "m.gguf")["architecture"] == family
    ids = ids_of(tok)
    want = logits(original, ids)
    assert (logits(load_gguf(tmp_path / "m.gguf"), ids) - want).abs().max() < 1e-4
    if family != "qwen3":  # transformers' qwen3 GGUF reader ignores attention.key_length (head_dim)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
        assert (logits(hf.eval(), ids) - want).abs().max() < 1e-4


def test_llama3_rope_from_a_file_zenlm_did_not_write(tok, tmp_path):
    """llama.cpp's keys carry llama3 rope only as the rope_freqs tensor: without zenlm's own key the
    settings are found among Meta's (Llama 3.1: factor 8, low 1, high 4, original 8192)."""
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    model = tiny(tok, rope_scaling=rope, max_position_embeddings=128)
    export_gguf(model, tok, tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "foreign.gguf", lambda n, d: (d, None), drop=("zenlm.rope_scaling",))
    assert "zenlm.rope_scaling" not in inspect_gguf(tmp_path / "foreign.gguf")["keys"]
    back = load_gguf(tmp_path / "foreign.gguf")
    assert back.config.rope_scaling == rope
    ids = ids_of(tok)
    assert torch.equal(logits(back, ids), logits(model, ids))
    odd = tiny(tok, rope_scaling={**rope, "factor": 3.0})
    export_gguf(odd, tok, tmp_path / "odd.gguf")
    rewrite(tmp_path / "odd.gguf", tmp_path / "odd-foreign.gguf", lambda n, d: (d, None), drop=("zenlm.rope_scaling",))
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        load_gguf(tmp_path / "odd-foreign.gguf")


def test_cli_export_gguf_then_load_it_back(tok, tmp_path, capsys):
    from zenlm.cli import main

    model = tiny(tok)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert main(["export", "gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    assert "llama f32" in capsys.readouterr().out
    back = zenlm.load(tmp_path / "m.gguf")
    ids = ids_of(tok)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=0)
    # a model llama.cpp cannot take is one line and exit 2, naming what does not map
    gpt = zenlm.TransformerConfig.from_preset("tiny", vocab_size=tok.vocab_size, norm="layernorm", position="learned")
    zenlm.TransformerLM(gpt).save_pretrained(tmp_path / "gpt", tokenizer=tok)
    assert main(["export", "gguf", str(tmp_path / "gpt"), str(tmp_path / "gpt.gguf")]) == 2
    assert "position" in capsys.readouterr().err
