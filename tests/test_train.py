"""The trainer: config validation, schedule, every objective end to end, exact resume after
SIGKILL, atomic checkpoints, and 2-process DDP equal to one process on the same global batch."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
from zenlm.checkpoint import load_weights
from zenlm.config import estimate_costs
from zenlm.train import (OptimConfig, TrainConfig, Trainer, enable_activation_checkpointing, find_latest_checkpoint,
                         lr_lambda, make_optimizer, parse_overrides)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_encoder_layers": 0, "num_decoder_layers": 2, "num_attention_heads": 2, "hidden_size": 32,
              "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def run_config(tmp_path: Path, corpus: Path, **over) -> dict:
    config = {"out_dir": str(tmp_path / "run"), "model": dict(TINY_MODEL), "tokenizer": {"kind": "char"},
              "data": {"train": [str(corpus)], "seq_len": 32, "cache_dir": str(tmp_path / "cache"), "num_workers": 1},
              "optim": {"lr": 3e-3, "warmup_steps": 2}, "max_steps": 12, "batch_size": 4, "eval_interval": 6,
              "eval_batches": 2, "log_interval": 1, "precision": "fp32", "threads": 1, "peak_flops": 1e11,
              "progress": False, "plot": False, "seed": 7}
    for key, value in over.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config


def losses(out_dir: Path) -> list:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


# --------------------------------------------------------------------------- config
def test_config_errors_name_the_key(tmp_path, corpus):
    base = run_config(tmp_path, corpus)
    cases = [({"optim": {**base["optim"], "lrr": 1}}, "unknown key optim.lrr"),
             ({"optim": {**base["optim"], "lr": -1.0}}, "optim.lr must be > 0"),
             ({"max_steps": "many"}, "max_steps must be int"),
             ({"batch_size": 0}, "batch_size must be > 0"),
             ({"data": {**base["data"], "objective": "magic"}}, "data.objective must be one of"),
             ({"data": {**base["data"], "seq_len": 1.5}}, "data.seq_len must be int"),
             ({"model": {**TINY_MODEL, "hidden": 3}}, "unknown key model.hidden"),
             ({"precision": "fp8"}, "precision must be one of"),
             ({"attention_backend": "fast"}, "attention_backend must be one of auto, math"),
             ({"optim": {**base["optim"], "schedule": "step"}}, "optim.schedule must be one of")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict({**base, **change})


def test_yaml_overrides_and_relative_paths(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus)
    cfg["data"]["train"] = ["../corpus.txt"]
    (tmp_path / "corpus.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    overrides = parse_overrides(["--optim.lr", "1e-2", "--data.seq_len=16", "--compile", "true"])
    assert overrides == {"optim.lr": "1e-2", "data.seq_len": 16, "compile": True}
    config = TrainConfig.from_yaml(path, overrides)
    assert config.optim.lr == 0.01 and config.data.seq_len == 16 and config.compile is True
    assert config.data.train == [str((tmp_path / "corpus.txt").resolve())]
    with pytest.raises(ValueError, match="--optim.lr"):
        parse_overrides(["--optim.lr"])


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 10\noptim: {lr: -3}\ndata: {train: [x]}\n")
    result = subprocess.run([sys.executable, "-m", "zenlm.cli", "train", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: optim.lr must be > 0, got -3.0"]


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


def _cpu_with(monkeypatch, bf16: bool):
    """Make zenlm see a CPU with (Zen 4) or without (Zen 3) native bf16, whatever this host is."""
    from zenlm import cpu

    flags = {"avx2", "fma"} | ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"} if bf16 else set())
    fake = cpu.detect(env={}, flags=frozenset(flags), model="Zen 4" if bf16 else "Zen 3", arch="x86_64")
    monkeypatch.setattr(cpu, "cpu_info", lambda: fake)


def test_bf16_autocast_trains(tmp_path, corpus, monkeypatch):
    # the bf16 path itself, on every host (emulated where the CPU has no bf16: tiny, so still quick)
    _cpu_with(monkeypatch, bf16=True)
    cfg = run_config(tmp_path, corpus, precision="bf16", max_steps=4)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    assert trainer.amp_dtype == torch.bfloat16
    summary = trainer.train()
    assert math.isfinite(summary["best_val_loss"])
    assert load_weights(Path(cfg["out_dir"]) / "best" / "model.safetensors")["embed_tokens.weight"].dtype == torch.float32


def test_precision_on_the_cpu_it_has(tmp_path, corpus, monkeypatch, caplog):
    """A recipe's bf16 on a CPU without native bf16 trains in fp32 and says so; strict fails fast."""
    _cpu_with(monkeypatch, bf16=False)
    for asked in ("bf16", "auto"):
        with caplog.at_level("WARNING", logger="zenlm.cpu"):
            trainer = Trainer(TrainConfig.from_dict(run_config(tmp_path, corpus, precision=asked, max_steps=1,
                                                               out_dir=str(tmp_path / asked))))
        assert trainer.amp_dtype is None and trainer.precision == "fp32"
    assert caplog.text.count("bf16 -> fp32") == 1  # said for the explicit bf16 only, not for auto
    cfg = run_config(tmp_path, corpus, precision="bf16", strict_precision=True, out_dir=str(tmp_path / "strict"))
    with pytest.raises(ValueError, match="no native bf16"):
        Trainer(TrainConfig.from_dict(cfg))
    _cpu_with(monkeypatch, bf16=True)
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


# --------------------------------------------------------------------------- checkpoints and resume
def test_half_written_checkpoint_is_never_latest(tmp_path, corpus, monkeypatch):
    cfg = run_config(tmp_path, corpus, max_steps=4, eval_interval=2)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    trainer.train()
    out = Path(cfg["out_dir"])
    assert find_latest_checkpoint(out).name == "step-00000004"
    ckpts = out / "checkpoints"
    # a crash while writing step 6: the temporary folder exists with a truncated file
    tmp = ckpts / ".step-00000006.tmp-999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    # a folder with the right name but no COMPLETE marker (e.g. copied by hand, interrupted)
    (ckpts / "step-00000008").mkdir()
    (ckpts / "step-00000008" / "model.safetensors").write_bytes(b"\x00" * 10)
    assert find_latest_checkpoint(out).name == "step-00000004"
    (out / "latest").unlink()  # even without the pointer
    assert find_latest_checkpoint(out).name == "step-00000004"
    # a save that dies half-way leaves the previous checkpoint as latest
    trainer.step = 10

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("zenlm.train.state.save_weights", die)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert find_latest_checkpoint(out).name == "step-00000004"
    assert not (ckpts / "step-00000010").exists()


def test_sigkill_after_checkpoint_resumes_bit_exact(tmp_path, corpus):
    """A CPU run killed (SIGKILL) after a checkpoint and resumed logs exactly the losses of an
    uninterrupted run."""
    steps = 80
    cfg = run_config(tmp_path, corpus, **{"max_steps": steps, "eval_interval": 0, "checkpoint_interval": 10,
                                          "data.sampling": "random", "model.dropout": 0.1,
                                          "data.objective": "causal"})
    reference = run_config(tmp_path, corpus, **{"max_steps": steps, "eval_interval": 0, "checkpoint_interval": 10,
                                                "data.sampling": "random", "model.dropout": 0.1,
                                                "out_dir": str(tmp_path / "reference")})
    Trainer(TrainConfig.from_dict(reference)).train()
    expected = losses(tmp_path / "reference")
    assert len(expected) == steps

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = Path(cfg["out_dir"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while find_latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = int(find_latest_checkpoint(out).name[5:])
    assert killed_at < steps
    result = subprocess.run([sys.executable, "-m", "zenlm.cli", "train", str(path)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    assert losses(out) == expected  # bit-exact: floats compared for equality


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_ddp_equals_single_process(tmp_path, corpus, strategy):
    """torchrun --nproc_per_node=2 (gloo) with batch 2 per rank ends with the parameters of one
    process training on the same global batch of 4 (DDP replicates, FSDP shards the model)."""
    base = {"max_steps": 6, "eval_interval": 3, "checkpoint_interval": 3, "data.sampling": "packed",
            "optim.grad_clip": 0.5, "eval_batch_size": 4, "distributed": strategy}
    single = run_config(tmp_path, corpus, **{**base, "batch_size": 4, "out_dir": str(tmp_path / "single")})
    Trainer(TrainConfig.from_dict(single)).train()
    ddp = run_config(tmp_path, corpus, **{**base, "batch_size": 2, "out_dir": str(tmp_path / "ddp")})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(ddp))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "zenlm.cli", "train",
                             str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_weights(tmp_path / "single" / "checkpoints" / "step-00000006" / "model.safetensors")
    b = load_weights(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        # atol covers the key half of qkv.bias: its true gradient is 0 (softmax ignores a per-key
        # constant), so Adam scales rounding noise of order 1e-10 up to ~1e-6 steps
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    la, lb = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5)
    va, vb = ([json.loads(r)["val_loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in r] for d in ("single", "ddp"))
    assert len(va) == len(vb) == 2 and va == pytest.approx(vb, rel=1e-5)  # evaluation split across ranks
    # only rank 0 wrote: one metrics file, one set of checkpoints
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


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
