"""LoRA: only adapters train, merge is exact, adapters save alone and refuse the wrong base."""
import json

import pytest
import torch

from zenlm import TransformerConfig, TransformerLM
from zenlm.checkpoint import unique_state_dict
from zenlm.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
    unmerge,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(family: str = "encoder-decoder", hidden: int = 32, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    enc = 2 if family == "encoder-decoder" else 0
    config = TransformerConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                               num_encoder_layers=enc, num_decoder_layers=2, max_position_embeddings=32)
    return TransformerLM(config).eval()


def batch(model: TransformerLM):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    labels = torch.randint(3, 64, (2, 5), generator=g)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids}


def randomize_adapters(model: TransformerLM) -> None:
    """B starts at zero (a no-op adapter); give it values so the tests test something."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_gradients_reach_adapters_only(family):
    model = tiny(family)
    before = {k: v.clone() for k, v in unique_state_dict(model).items()}
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["attn.qkv", "cross_attn.kv", "mlp.fc_out"]))
    assert names and all(n.endswith(("attn.qkv", "cross_attn.kv", "mlp.fc_out")) for n in names)
    randomize_adapters(model)
    model.train()
    model(**batch(model)).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable, total = trainable_parameters(model)
    assert trainable == sum(t.numel() for t in lora_state_dict(model).values()) and trainable < total
    # an optimizer step over the trainable parameters leaves the base untouched
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    after = {k: v for k, v in unique_state_dict(model).items() if ".lora_" not in k}
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_merged_outputs_equal_unmerged(family):
    model = tiny(family)
    base_logits = model(**batch(model)).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=16, target_modules=["attn.qkv", "attn.out", "cross_attn.q",
                                                                     "cross_attn.kv", "cross_attn.out", "mlp.fc_in",
                                                                     "mlp.fc_out"]))
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(**batch(model)).logits
        assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # the adapter does change the model
        merge(model)
        merged = model(**batch(model)).logits
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model(**batch(model)).logits, unmerged, atol=1e-5, rtol=0)
        plain = merge_and_unload(model)
        assert not any(".lora_" in k for k in plain.state_dict())
        torch.testing.assert_close(plain(**batch(plain)).logits, unmerged, atol=1e-5, rtol=0)


def test_adapter_saves_alone_and_reloads_onto_its_base(tmp_path):
    model = tiny()
    base_state = {k: v.clone() for k, v in unique_state_dict(model).items()}
    apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.1))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(**batch(model)).logits
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert saved.keys() == lora_state_dict(model).keys() and all(".lora_" in k for k in saved)
    info = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert info["lora"]["rank"] == 2 and info["lora"]["dropout"] == 0.1
    assert info["base"]["embed_tokens.weight"] == [64, 32]

    fresh = tiny()
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch(fresh)).logits, expected, atol=1e-6, rtol=0)


def test_adapter_refuses_a_base_of_another_shape(tmp_path):
    model = tiny(hidden=32)
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a")
    other = tiny(hidden=64)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_adapter(other, tmp_path / "a")
    message = str(err.value)
    assert "'encoder.layers.0.attn.qkv.weight'" in message and "(192, 64)" in message and "(96, 32)" in message
    # nothing was changed on the refused base
    assert getattr(other, "lora_config", None) is None
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="does not have|does not fit"):
        load_adapter(tiny("decoder-only"), tmp_path / "a")


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="'attn.qvk' matches no Linear"):
        apply_lora(tiny(), LoRAConfig(target_modules=["attn.qvk"]))
    # the default targets include cross-attention, which a decoder-only model lacks: still fine
    assert apply_lora(tiny("decoder-only"), LoRAConfig())
