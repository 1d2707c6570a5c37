"""zenlm.train.loop: the schedule, weight-decay groups, activation checkpointing, every objective
end to end, init_from, early stopping, attention kernels, precision, compile, label smoothing."""
import json
import math
from pathlib import Path

import pytest
import torch

import zenlm
from zenlm.checkpoint import load_weights
from zenlm.config import estimate_costs
from zenlm.train import (OptimConfig, TrainConfig, Trainer, enable_activation_checkpointing, find_latest_checkpoint,
                         lr_lambda, make_optimizer)

from .conftest import TINY_MODEL, losses, run_config


def test_lr_schedule_matches_nanogpt():
    """nanoGPT's get_lr (train.py): linear warmup lr*(it+1)/(warmup+1), cosine to min_lr."""
    lr, min_lr, warmup, decay = 1e-3, 1e-4, 100, 2000

    def nanogpt(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    f = lr_lambda(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, decay_steps=decay), 2000)
    for it in (0, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500):
        assert lr * f(it) == pytest.approx(nanogpt(it), rel=1e-12)
    linear = lr_lambda(OptimConfig(lr=lr, min_lr=0.0, warmup_steps=0, schedule="linear"), 100)
    assert [linear(s) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]


def test_weight_decay_groups():
    model = zenlm.TransformerLM(zenlm.TransformerConfig(vocab_size=50, **TINY_MODEL))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] is True


def test_activation_checkpointing_keeps_gradients_and_names():
    torch.manual_seed(0)
    config = zenlm.TransformerConfig(vocab_size=50, **TINY_MODEL)
    a, b = zenlm.TransformerLM(config), zenlm.TransformerLM(config)
    b.load_state_dict(a.state_dict())
    enable_activation_checkpointing(b)
    assert list(a.state_dict()) == list(b.state_dict())
    ids = torch.randint(0, 50, (2, 16))
    a(ids, labels=ids).loss.backward()
    b(ids, labels=ids).loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# --------------------------------------------------------------------------- objectives end to end
@pytest.mark.parametrize("objective,family", [("causal", "decoder-only"), ("masked", "encoder-only"),
                                              ("denoise", "encoder-decoder")])
def test_each_lm_objective_trains_and_writes_outputs(tmp_path, corpus, objective, family):
    model = dict(TINY_MODEL)
    if family == "encoder-only":
        model.update(num_encoder_layers=2, num_decoder_layers=0)
    elif family == "encoder-decoder":
        model.update(num_encoder_layers=1, num_decoder_layers=1)
    cfg = run_config(tmp_path, corpus, **{"model": model, "data.objective": objective, "max_steps": 30,
                                          "eval_interval": 15, "plot": True, "optim.lr": 1e-2})
    summary = Trainer(TrainConfig.from_dict(cfg)).train()
    out = Path(cfg["out_dir"])
    seq = losses(out)
    assert [s for s, _ in seq] == list(range(1, 31))
    assert sum(l for _, l in seq[-5:]) < sum(l for _, l in seq[:5])  # it learns
    assert summary["best_val_loss"] < math.log(80)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    best = zenlm.load(out / "best")
    assert best.config.family == family
    latest = find_latest_checkpoint(out)
    assert latest.name == "step-00000030" and zenlm.load(latest).config.family == family


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_chat_and_pairs_objectives_train(tmp_path, family):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i}+1?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(40)]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{i}\t{i * 2}\n" for i in range(40)))
    model = dict(TINY_MODEL)
    if family == "encoder-decoder":
        model.update(num_encoder_layers=1, num_decoder_layers=1)
    for objective, fmt, path in (("chat", "chat", chat), ("seq2seq", "pairs", pairs)):
        cfg = run_config(tmp_path, path, **{"model": model, "data.objective": objective, "data.format": fmt,
                                            "data.seq_len": 40, "data.max_source_len": 30,
                                            "data.max_target_len": 30, "out_dir": str(tmp_path / objective),
                                            "max_steps": 20, "eval_interval": 10, "optim.lr": 1e-2})
        summary = Trainer(TrainConfig.from_dict(cfg)).train()
        seq = losses(Path(cfg["out_dir"]))
        assert len(seq) == 20 and seq[-1][1] < seq[0][1] and math.isfinite(summary["best_val_loss"])


def test_init_from_fine_tunes_a_saved_model_with_its_tokenizer(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus, max_steps=4, eval_interval=4)
    Trainer(TrainConfig.from_dict(cfg)).train()
    best = Path(cfg["out_dir"]) / "best"
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Speak."},
                                                     {"role": "assistant", "content": f"Thou art {i}."}]}) + "\n"
                            for i in range(30)))
    tuned = run_config(tmp_path, chat, **{"init_from": str(best), "out_dir": str(tmp_path / "tuned"),
                                          "data.objective": "chat", "data.format": "chat", "data.seq_len": 40,
                                          "max_steps": 2, "eval_interval": 2})
    del tuned["model"], tuned["tokenizer"]
    trainer = Trainer(TrainConfig.from_dict(tuned))
    saved = load_weights(best / "model.safetensors")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert trainer.tokenizer.backend.to_str() == zenlm.Tokenizer.load(best).backend.to_str()
    trainer.train()
    assert zenlm.load(tmp_path / "tuned" / "best").config == zenlm.load(best).config


def test_objective_must_fit_the_model_family(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus, **{"data.objective": "denoise"})
    with pytest.raises(ValueError, match="data.objective='denoise' needs a model that is encoder-decoder; the model is decoder-only"):
        Trainer(TrainConfig.from_dict(cfg))
    cfg = run_config(tmp_path, corpus, **{"data.seq_len": 64})
    with pytest.raises(ValueError, match="data needs 65 positions .* model.max_position_embeddings is 64"):
        Trainer(TrainConfig.from_dict(cfg))


def test_pairs_ignore_seq_len_and_check_their_own_lengths(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{i}\t{i * 2}\n" for i in range(40)))
    model = dict(TINY_MODEL, num_encoder_layers=1, num_decoder_layers=1)  # 64 positions
    over = {"model": model, "data.objective": "seq2seq", "data.format": "pairs", "data.seq_len": 4096,
            "data.max_source_len": 30, "data.max_target_len": 30, "max_steps": 2, "eval_interval": 2}
    trainer = Trainer(TrainConfig.from_dict(run_config(tmp_path, pairs, **over)))  # seq_len 4096 > 64: not checked
    assert trainer.flops_per_token == estimate_costs(trainer.model_config, 1, 30)["training_flops_per_token"]
    assert math.isfinite(trainer.train()["best_val_loss"])
    over["data.max_source_len"] = 80
    with pytest.raises(ValueError, match="data needs 80 positions .* model.max_position_embeddings is 64"):
        Trainer(TrainConfig.from_dict(run_config(tmp_path, pairs, **over, out_dir=str(tmp_path / "b"))))
    over.update({"data.max_source_len": 40, "model": dict(TINY_MODEL)})  # decoder-only reads source + target
    with pytest.raises(ValueError, match="data needs 70 positions"):
        Trainer(TrainConfig.from_dict(run_config(tmp_path, pairs, **over, out_dir=str(tmp_path / "c"))))


def test_early_stopping_and_target_loss(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus, **{"optim.lr": 1e-9, "optim.warmup_steps": 0, "max_steps": 40,
                                          "eval_interval": 2, "early_stopping_patience": 2, "early_stopping_min_delta": 1e-3,
                                          "optim.schedule": "constant"})
    summary = Trainer(TrainConfig.from_dict(cfg)).train()
    assert summary["stop"] == "early_stopping" and summary["step"] < 40
    cfg = run_config(tmp_path, corpus, **{"out_dir": str(tmp_path / "t"), "max_steps": 40, "eval_interval": 2,
                                          "target_loss": 100.0})
    summary = Trainer(TrainConfig.from_dict(cfg)).train()
    assert summary["stop"] == "target_loss" and summary["step"] == 2


def test_attention_backend_math_follows_the_default_kernel(tmp_path, corpus):
    """The math kernel is the same formula: fp32 losses agree with torch's default choice to rounding."""
    runs = {}
    for backend in ("auto", "math"):
        cfg = run_config(tmp_path, corpus, attention_backend=backend, max_steps=6, out_dir=str(tmp_path / backend))
        Trainer(TrainConfig.from_dict(cfg)).train()
        runs[backend] = [loss for _, loss in losses(Path(cfg["out_dir"]))]
    assert runs["auto"] == pytest.approx(runs["math"], rel=1e-4) and runs["auto"][-1] < runs["auto"][0]
    # the setting really selects the kernel: the memory-efficient one does not exist on a CPU
    cfg = run_config(tmp_path, corpus, attention_backend="efficient", max_steps=1, out_dir=str(tmp_path / "eff"))
    with pytest.raises(RuntimeError, match="No viable backend"):
        Trainer(TrainConfig.from_dict(cfg)).train()


def test_bf16_autocast_trains(tmp_path, corpus, cpu_with):
    # the bf16 path itself, on every host (emulated where the CPU has no bf16: tiny, so still quick)
    cpu_with(bf16=True)
    cfg = run_config(tmp_path, corpus, precision="bf16", max_steps=4)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    assert trainer.amp_dtype == torch.bfloat16
    summary = trainer.train()
    assert math.isfinite(summary["best_val_loss"])
    assert load_weights(Path(cfg["out_dir"]) / "best" / "model.safetensors")["embed_tokens.weight"].dtype == torch.float32


def test_precision_on_the_cpu_it_has(tmp_path, corpus, cpu_with, caplog):
    """A recipe's bf16 on a CPU without native bf16 trains in fp32 and says so; strict fails fast."""
    cpu_with(bf16=False)
    for asked in ("bf16", "auto"):
        with caplog.at_level("WARNING", logger="zenlm.cpu"):
            trainer = Trainer(TrainConfig.from_dict(run_config(tmp_path, corpus, precision=asked, max_steps=1,
                                                               out_dir=str(tmp_path / asked))))
        assert trainer.amp_dtype is None and trainer.precision == "fp32"
    assert caplog.text.count("bf16 -> fp32") == 1  # said for the explicit bf16 only, not for auto
    cfg = run_config(tmp_path, corpus, precision="bf16", strict_precision=True, out_dir=str(tmp_path / "strict"))
    with pytest.raises(ValueError, match="no native bf16"):
        Trainer(TrainConfig.from_dict(cfg))
    cpu_with(bf16=True)
    trainer = Trainer(TrainConfig.from_dict(run_config(tmp_path, corpus, precision="auto", out_dir=str(tmp_path / "a"))))
    assert trainer.amp_dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path, corpus):
    """``compile: true`` runs the step through torch.compile (inductor) without changing the
    arithmetic beyond kernel rounding; evaluation runs eagerly (no recompiles for its shapes)."""
    runs = {}
    for compiled in (False, True):
        cfg = run_config(tmp_path, corpus, compile=compiled, max_steps=4, eval_interval=4,
                         out_dir=str(tmp_path / f"compile-{compiled}"))
        trainer = Trainer(TrainConfig.from_dict(cfg))
        assert (trainer.forward is not trainer.wrapped) == compiled
        summary = trainer.train()
        runs[compiled] = [loss for _, loss in losses(Path(cfg["out_dir"]))]
        assert math.isfinite(summary["best_val_loss"])
    assert runs[True] == pytest.approx(runs[False], rel=1e-3) and len(runs[True]) == 4


def test_label_smoothing_shapes_the_training_loss_only(tmp_path):
    """Training minimises (1-e)*NLL + e*mean(-log p) over the vocabulary; validation reports plain NLL."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{i} plus {i}\t{2 * i}\n" for i in range(60)))
    model = dict(TINY_MODEL, num_encoder_layers=1, num_decoder_layers=1)
    cfg = run_config(tmp_path, pairs, **{"model": model, "data.objective": "seq2seq", "data.format": "pairs",
                                         "data.max_source_len": 30, "data.max_target_len": 30,
                                         "data.group_by_length": 2, "label_smoothing": 0.1, "max_steps": 4})
    trainer = Trainer(TrainConfig.from_dict(cfg))
    batch = trainer.data.train.batch(range(4))
    logits = trainer.model(**batch).logits.float()
    logp = logits.log_softmax(-1)
    keep = batch["labels"] != -100
    nll = -logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0][keep].mean()
    uniform = -logp.mean(-1)[keep].mean()
    trainer.wrapped.train()
    torch.testing.assert_close(trainer.compute_loss(batch), 0.9 * nll + 0.1 * uniform, rtol=1e-5, atol=1e-5)
    trainer.wrapped.eval()
    torch.testing.assert_close(trainer.compute_loss(batch), nll, rtol=1e-5, atol=1e-5)
    assert math.isfinite(trainer.train()["best_val_loss"])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        TrainConfig.from_dict(dict(cfg, label_smoothing=1.0))
