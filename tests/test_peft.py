"""PEFT adapter folders both ways, checked against peft itself on the transformers model.

zenlm fuses q|k|v (and Llama's gate|up) into one Linear; PEFT has one (A, B) pair per HF
projection. Out: A is written once per projection and B split by rows; in: the projections' A's
are stacked and B is block-diagonal (see zenlm/lora.py). Both are exact, so logits agree to
float rounding. Then the issue's flow: finetune an HF Llama with LoRA, export the merged model to
HF and the adapter as PEFT, and load both with transformers / peft."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zenlm
from zenlm import TransformerConfig, TransformerLM
from zenlm.lora import (
    LoRAConfig,
    apply_lora,
    is_peft_folder,
    load_adapter,
    load_with_adapter,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    save_adapter,
)

sys.path.insert(0, str(Path(__file__).parent / "hf"))
from hf_helpers import bpe  # noqa: E402
from hf_helpers import save_hf as save_hf_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ATOL = 1e-4
VOCAB = 128


def tiny_hf(family: str):
    """A tiny random transformers model: Llama with grouped KV heads (q, k, v of unequal sizes),
    GPT-2 (Conv1D layers, fan_in_fan_out) or BART (encoder-decoder, fused cross-attention k|v)."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                          rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                          initializer_range=0.1, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                     decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "bart"])
def hf_model(request, tmp_path_factory):
    model = tiny_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def inputs(family: str) -> dict:
    """A padded batch (the second row is shorter)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    if family == "bart":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :7]}
    return {"input_ids": ids, "attention_mask": mask}


def close(actual: torch.Tensor, expected: torch.Tensor, batch: dict) -> float:
    """Max difference over real positions; asserted within ATOL."""
    mask = (batch["attention_mask"] if "decoder_input_ids" not in batch
            else torch.ones_like(batch["decoder_input_ids"])).bool()
    diff = (actual[mask] - expected[mask]).abs().max().item()
    assert diff <= ATOL, diff
    return diff


def randomize_B(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


TARGETS = {"llama": ["attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"],
           "gpt2": ["attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"],
           "bart": ["attn.qkv", "cross_attn.q", "cross_attn.kv", "mlp.fc_out"]}
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "up_proj"], "gpt2": ["c_attn", "c_fc"],
                "bart": ["k_proj", "v_proj", "fc1"]}


# --------------------------------------------------------------------------- zenlm -> PEFT
def test_zenlm_adapter_as_peft_gives_transformers_the_same_logits(hf_model, tmp_path):
    family, hf, folder = hf_model
    ours = zenlm.load(folder)
    apply_lora(ours, LoRAConfig(rank=4, alpha=12, dropout=0.1, target_modules=TARGETS[family]))
    randomize_B(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "peft", format="peft", base_model_name_or_path=str(folder))
    assert is_peft_folder(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 4, 12, "none")
    assert cfg["base_model_name_or_path"] == str(folder) and cfg["fan_in_fan_out"] == (family == "gpt2")
    wrapped = peft.PeftModel.from_pretrained(type(hf).from_pretrained(folder), tmp_path / "peft").eval()
    batch = inputs(family)
    ref = logits(wrapped, batch)
    close(logits(ours, batch), ref, batch)
    assert (ref - logits(hf, batch)).abs().max() > 1e-2, "the adapter should change the outputs"


def test_fused_qkv_is_written_as_one_pair_per_projection(tmp_path):
    """q|k|v of a grouped-KV Llama (64 + 16 + 16 rows): A once per projection, B split by rows."""
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "base")
    ours = zenlm.load(tmp_path / "base")
    apply_lora(ours, LoRAConfig(rank=4, alpha=8, target_modules=["decoder.layers.1.attn.qkv", "mlp.fc_in"]))
    randomize_B(ours)
    save_adapter(ours, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # only layer 1's attention is adapted: the short name q_proj would select layer 0's too
    assert cfg["target_modules"] == sorted(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                            "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.gate_proj",
                                            "model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_proj",
                                            "model.layers.1.mlp.up_proj"])
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    layer = lora_layers(ours)["decoder.layers.1.attn.qkv"]
    rows = {"q": (0, 64), "k": (64, 80), "v": (80, 96)}
    for x, (lo, hi) in rows.items():
        key = f"base_model.model.model.layers.1.self_attn.{x}_proj"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], layer.lora_A.detach())
        assert torch.equal(tensors[f"{key}.lora_B.weight"], layer.lora_B.detach()[lo:hi])
    # and back: identical A's are recognised, so the fused layer gets its rank-4 pair again
    again = zenlm.load(tmp_path / "base")
    load_adapter(again, tmp_path / "peft")
    back, before = lora_state_dict(again), lora_state_dict(ours)
    assert set(back) == set(before) and all(torch.equal(back[k], before[k]) for k in before)
    assert all(layer.rank == 4 for layer in lora_layers(again).values())


# --------------------------------------------------------------------------- PEFT -> zenlm
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_zenlm_with_peft_logits(hf_model, tmp_path, rslora):
    family, hf, folder = hf_model
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=PEFT_TARGETS[family],
                             init_lora_weights=False, use_rslora=rslora,  # random A and B: every block counts
                             rank_pattern={PEFT_TARGETS[family][-1]: 2}, alpha_pattern={PEFT_TARGETS[family][1]: 5})
    torch.manual_seed(3)
    wrapped = peft.get_peft_model(type(hf).from_pretrained(folder), config).eval()
    wrapped.save_pretrained(tmp_path / "peft")
    batch = inputs(family)
    ref = logits(wrapped, batch)
    assert (ref - logits(hf, batch)).abs().max() > 1e-2

    ours = zenlm.load(folder)
    names = load_adapter(ours, tmp_path / "peft")
    ours.eval()
    close(logits(ours, batch), ref, batch)
    if family == "llama":  # q and v of the fused q|k|v: two rank-4 blocks, k's rows zero
        layer = lora_layers(ours)["decoder.layers.0.attn.qkv"]
        assert layer.rank == 8 and layer.peft_blocks == [(0, 4), None, (4, 8)]
        assert not layer.lora_B[64:80].any() and not layer.lora_B[:64, 4:].any() and not layer.lora_B[80:, :4].any()
        assert layer.scale == (16 / 2 if rslora else 16 / 4)
        assert lora_layers(ours)["decoder.layers.0.mlp.fc_in"].rank == 2  # gate|up, only up adapted
        assert "decoder.layers.1.attn.out" in names
    # merged: the same logits at no extra cost
    merged = merge_and_unload(ours)
    close(logits(merged, batch), ref, batch)

    # written back as PEFT: the original per-projection pairs, peft gives the same logits
    again = zenlm.load(folder)
    load_adapter(again, tmp_path / "peft")
    save_adapter(again, tmp_path / "back", format="peft")
    first = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert set(first) == set(second)
    reloaded = peft.PeftModel.from_pretrained(type(hf).from_pretrained(folder), tmp_path / "back").eval()
    close(logits(reloaded, batch), ref, batch)
    # and as zenlm's own format (per-layer ranks and scales kept)
    save_adapter(again, tmp_path / "own")
    third = zenlm.load(folder)
    load_adapter(third, tmp_path / "own")
    close(logits(third.eval(), batch), ref, batch)


def test_load_with_adapter_reads_peft_folders(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"],
                                                  init_lora_weights=False)).eval()
    wrapped.save_pretrained(tmp_path / "peft")
    batch = inputs("llama")
    model = load_with_adapter(tmp_path / "base", tmp_path / "peft")
    assert not lora_layers(model)  # merged into plain Linears
    close(logits(model, batch), logits(wrapped, batch), batch)


def test_lora_trained_after_a_peft_load_is_exported_exactly(tmp_path):
    """Once training fills B outside the per-projection blocks, the block split no longer holds:
    the export falls back to the shared-A form (3 copies of the stacked A), still exact."""
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "peft")
    ours = zenlm.load(tmp_path / "base")
    load_adapter(ours, tmp_path / "peft")
    randomize_B(ours, seed=9)  # as a few training steps would
    ours.eval()
    save_adapter(ours, tmp_path / "out", format="peft")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (4, 64)
    again = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "out").eval()
    batch = inputs("llama")
    close(logits(ours, batch), logits(again, batch), batch)


# --------------------------------------------------------------------------- bad input
def peft_folder(tmp_path, change: dict | None = None, tensors: dict | None = None):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(change or {})}))
    if tensors is not None:
        stored = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        save_file({**stored, **tensors}, str(tmp_path / "peft" / "adapter_model.safetensors"))
    return tmp_path / "base", tmp_path / "peft"


@pytest.mark.parametrize("change, message", [
    ({"bias": "all"}, r"bias='all' is not supported; zenlm's LoRA trains no biases \(needs bias 'none'\)"),
    ({"bias": "lora_only"}, r"bias='lora_only' is not supported"),
    ({"use_dora": True}, r"use_dora=True is not supported \(DoRA\)"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported; zenlm loads LoRA adapters"),
    ({"r": 0}, r"r must be an integer >= 1, got 0"),
])
def test_peft_settings_zenlm_cannot_represent_are_named(tmp_path, change, message):
    base, adapter = peft_folder(tmp_path, change)
    model = zenlm.load(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, adapter)
    assert not lora_layers(model)


def test_peft_tensors_that_do_not_fit_are_named(tmp_path):
    base, adapter = peft_folder(tmp_path, tensors={
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, VOCAB)})
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.embed_tokens\.lora_embedding_A' is not "
                                         r"the lora_A/lora_B of a Linear layer"):
        load_adapter(zenlm.load(base), adapter)
    base, adapter = peft_folder(tmp_path / "b", tensors={
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.rotary' has no counterpart in "
                                         r"zenlm's llama model \(its Linear layers are named .*q_proj"):
        load_adapter(zenlm.load(base), adapter)
    base, adapter = peft_folder(tmp_path / "c", tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_B has shape \(32, 2\), this base "
                                         r"with rank 2 needs \(64, 2\)"):
        load_adapter(zenlm.load(base), adapter)


def test_peft_export_needs_a_hugging_face_family_and_a_known_format(tmp_path):
    config = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_encoder_layers=0, num_decoder_layers=1, max_position_embeddings=32,
                               position="rotary", norm="layernorm")
    model = TransformerLM(config)
    apply_lora(model, LoRAConfig(rank=2, target_modules=["attn.qkv"]))
    with pytest.raises(ValueError, match="PEFT adapters are named after the Hugging Face model; this model matches no "
                                         "Hugging Face family"):
        save_adapter(model, tmp_path / "x", format="peft")
    with pytest.raises(ValueError, match="adapter format must be one of zenlm, peft, got 'gguf'"):
        save_adapter(model, tmp_path / "x", format="gguf")


# --------------------------------------------------------------------------- the flow
def test_finetune_an_hf_llama_then_export_merged_and_peft(tmp_path, capsys, monkeypatch):
    """`zenlm finetune HF-LLAMA DATA --method lora --adapter_format peft`, then `zenlm convert to-hf`
    of the merged model: transformers loads it with zenlm's logits; peft loads the adapter onto
    the original HF folder with the same logits."""
    from zenlm.cli import main

    monkeypatch.setenv("ZENLM_CACHE", str(tmp_path / "cache"))
    tok = bpe(["<unk>", "<s>", "</s>"], vocab_size=300, template="<s> $A")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    base = save_hf_folder(transformers.LlamaForCausalLM(config).eval(), tmp_path / "hf-base", tok,
                          bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    data = tmp_path / "train.txt"
    data.write_text("\n".join(["the quick brown fox jumps over the lazy dog."] * 40) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    code = main(["finetune", str(base), str(data), "--method", "lora", "--out", str(out), "--valid", str(data),
                 "--adapter_format", "peft", "--max_steps", "6", "--eval_interval", "3", "--batch_size", "4",
                 "--progress", "false", "--plot", "false", "--peak_flops", "1.0e12", "--threads", "1",
                 "--optim.lr", "0.02", "--optim.warmup_steps", "0", "--lora.rank", "4",
                 "--lora.target_modules", "[attn.qkv, attn.out, mlp.fc_in, mlp.fc_out]"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["adapter_format"] == "peft" and is_peft_folder(out / "adapter")
    assert (out / "best" / "tokenizer_config.json").is_file()  # the HF side files travel into best/

    assert main(["convert", "to-hf", str(out / "best"), str(tmp_path / "hf-merged")]) == 0
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    wrapped = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                             out / "adapter").eval()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base.resolve())
    enc = zenlm.load_tokenizer(tmp_path / "hf-merged").encode_batch(["the lazy dog", "a quick brown fox jumps"],
                                                                    add_special_tokens=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ours = logits(zenlm.load(out / "best"), batch)
    close(logits(merged_hf, batch), ours, batch)
    close(logits(wrapped, batch), ours, batch)
    assert (ours - logits(original, batch)).abs().max() > 1e-3, "fine-tuning should have changed the model"
    # zenlm reads the PEFT adapter back onto the original HF folder, to the same logits
    close(logits(load_with_adapter(base, out / "adapter"), batch), ours, batch)


def test_adapter_format_option_is_checked(tmp_path):
    from tiny_app_models import save_tiny

    from zenlm.tasks.finetune import build_config, finetune

    base = save_tiny(tmp_path / "base", family="decoder-only")
    data = tmp_path / "train.txt"
    data.write_text("hello there\n" * 20)
    with pytest.raises(ValueError, match="adapter_format must be one of zenlm, peft, got 'gguf'"):
        build_config(base, data, "lora", overrides={"adapter_format": "gguf"})
    with pytest.raises(ValueError, match="adapter_format='peft' applies to --method lora"):
        build_config(base, data, "full", overrides={"adapter_format": "peft"})
    with pytest.raises(ValueError, match="adapter_format must be one of zenlm, peft, got 'safetensors'"):
        finetune(base, data, "lora", adapter_format="safetensors", out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
