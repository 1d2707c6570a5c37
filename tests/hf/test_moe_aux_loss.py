"""The experts' load-balancing loss (Switch Transformer; transformers' load_balancing_loss_func with
router_aux_loss_coef and output_router_logits) as an additive term of zenlm's loss: on a tiny Mixtral and a
Qwen2-MoE with a dense layer, zenlm's aux_loss, loss and router gradients equal transformers' on a padded batch
and without a mask; the Trainer adds it to the training loss only."""
import pytest
import torch

import zenlm
from family_checks import build, padded_batch
from zenlm.kernels import IGNORE_INDEX
from zenlm.model import load_balancing_loss
from zenlm.train.config import TrainConfig
from zenlm.train.loop import Trainer

transformers = pytest.importorskip("transformers")

COEF = 0.5  # large, so a wrong aux term shows in the loss and the router gradients
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
              num_experts_per_tok=2, router_aux_loss_coef=COEF, output_router_logits=True)
MODELS = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
          "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                             mlp_only_layers=[0]))}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    config_class, model_class, extra = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(transformers, config_class, model_class, folder, **extra, **COMMON)
    return hf, zenlm.load(folder)


def _router_grads(model, names: str) -> list[torch.Tensor]:
    return [p.grad.clone() for n, p in model.named_parameters() if n.endswith(names)]


@pytest.mark.parametrize("masked", [True, False], ids=["padded", "no-mask"])
def test_aux_loss_loss_and_router_gradients_match_transformers(pair, masked):
    hf, ours = pair
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    args = dict(attention_mask=mask) if masked else {}
    hf.zero_grad()
    ref = hf(input_ids=ids, labels=labels, output_router_logits=True, **args)
    ref.loss.backward()
    ours.zero_grad()
    out = ours(ids, labels=labels, router_aux_loss_coef=COEF, **args)
    out.loss.backward()
    plain = ours(ids, labels=labels, **args)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)
    assert out.aux_loss.item() > hf.config.num_experts_per_tok  # a random router is not balanced: the term counts
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss - plain.loss, COEF * out.aux_loss, atol=1e-5, rtol=1e-5)
    theirs, mine = _router_grads(hf, "mlp.gate.weight"), _router_grads(ours, "mlp.router.weight")
    assert len(mine) == len(theirs) == (1 if hf.config.model_type == "qwen2_moe" else 2)  # dense layers route nothing
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_loss_is_k_for_uniform_routing_and_grows_when_tokens_crowd():
    uniform = [torch.zeros(12, 4), torch.zeros(12, 4)]
    assert float(load_balancing_loss(uniform, top_k=2)) == pytest.approx(2.0)
    crowded = [torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(12, 1)]
    assert float(load_balancing_loss(crowded, top_k=2)) > 3.5
    # a padded row counts for nothing: crowded real rows, uniform padding
    mixed = [torch.cat([crowded[0][:6], uniform[0][:6]])]
    mask = torch.tensor([[1] * 6 + [0] * 6])
    assert float(load_balancing_loss(mixed, 2, mask)) == pytest.approx(float(load_balancing_loss(crowded, 2)))


def test_the_trainer_adds_it_to_the_training_loss_only(pair):
    _, ours = pair
    ids, mask = padded_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))
    trainer = object.__new__(Trainer)  # compute_loss needs only the config and the model
    trainer.config, trainer.model_config = TrainConfig(router_aux_loss_coef=COEF), ours.config
    trainer.wrapped = trainer.forward = ours
    with torch.no_grad():
        ours.train()
        trained = trainer.compute_loss(batch)
        ours.eval()
        validated = trainer.compute_loss(batch)
        out = ours(**batch, router_aux_loss_coef=COEF)
    torch.testing.assert_close(trained, out.loss)
    torch.testing.assert_close(validated, out.loss - COEF * out.aux_loss)
    with pytest.raises(ValueError, match="router_aux_loss_coef must be >= 0, got -0.1"):
        TrainConfig(router_aux_loss_coef=-0.1).validate()
