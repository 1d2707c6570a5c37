"""`zenlm finetune`: LoRA trains adapters only and writes adapter + merged model; full tunes all weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_app_models import save_tiny

from zenlm import load
from zenlm.checkpoint import unique_state_dict
from zenlm.cli import main
from zenlm.lora import load_with_adapter
from zenlm.tasks.finetune import build_config, infer_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = ["A man rides a bike.\tEin Mann fährt Fahrrad.", "Two dogs play in the snow.\tZwei Hunde spielen im Schnee.",
         "Hello, how are you today?\tHallo!"] * 6
QUICK = ["--max_steps", "8", "--eval_interval", "4", "--batch_size", "6", "--progress", "false", "--plot", "false",
         "--peak_flops", "1.0e12", "--threads", "1", "--optim.lr", "0.01", "--optim.warmup_steps", "0"]


@pytest.fixture()
def setup(tmp_path):
    base = save_tiny(tmp_path / "base", extra={"source_lang": "en", "target_lang": "de"})
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(PAIRS) + "\n", encoding="utf-8")
    return base, data, tmp_path


def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(9, 40, (2, 6), generator=g), "labels": torch.randint(9, 40, (2, 5), generator=g)}


def test_lora_finetune_writes_adapter_and_merged_model(setup, capsys, monkeypatch):
    base, data, tmp = setup
    monkeypatch.setenv("ZENLM_CACHE", str(tmp / "cache"))
    out = tmp / "run-lora"
    code = main(["finetune", str(base), str(data), "--method", "lora", "--valid", str(data), "--out", str(out),
                 *QUICK, "--lora.rank", "4", "--lora.target_modules", "[attn.qkv, cross_attn.kv]"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "lora" and summary["trainable_parameters"] < summary["parameters"] / 5
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert adapter and all(k.endswith((".lora_A", ".lora_B")) for k in adapter)
    assert all(k.split(".lora_")[0].endswith(("attn.qkv", "cross_attn.kv")) for k in adapter)
    vals = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert len(vals) == 2 and vals[-1] < vals[0]  # it learned (train = valid here)
    # best/ is a plain model: the base with the adapter merged in
    merged = load(out / "best")
    assert merged.config.extra["target_lang"] == "de"
    with torch.no_grad():
        via_adapter = load_with_adapter(base, out / "adapter")(**batch()).logits
        torch.testing.assert_close(merged(**batch()).logits, via_adapter, atol=1e-5, rtol=0)
        assert not torch.allclose(load(base)(**batch()).logits, via_adapter, atol=1e-4)


def test_full_finetune_changes_every_weight_matrix(setup, capsys, monkeypatch):
    base, data, tmp = setup
    monkeypatch.setenv("ZENLM_CACHE", str(tmp / "cache"))
    out = tmp / "run-full"
    assert main(["finetune", str(base), str(data), "--method", "full", "--out", str(out), *QUICK, "--max_steps", "2",
                 "--eval_interval", "0", "--data.val_fraction", "0.2"]) == 0, capsys.readouterr().err
    before, after = unique_state_dict(load(base)), unique_state_dict(load(out / "best"))
    changed = [k for k in before if k.endswith(".weight") and before[k].dim() == 2 and not torch.equal(before[k], after[k])]
    assert len(changed) == sum(1 for k in before if k.endswith(".weight") and before[k].dim() == 2)


def test_finetune_config_and_bad_input(setup, tmp_path):
    base, data, _ = setup
    assert infer_data(data) == {"format": "pairs", "objective": "seq2seq"}
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert infer_data(chat) == {"format": "chat", "objective": "chat"}
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text("lora: {rank: 2, alpha: 4}\nmax_steps: 7\noptim: {lr: 0.002}\n")
    config, lora = build_config(base, data, "lora", yaml_file)
    assert (lora.rank, lora.alpha, config.max_steps, config.optim.lr) == (2, 4, 7, 0.002)
    assert config.init_from == str(base.resolve()) and config.data.objective == "seq2seq"
    with pytest.raises(ValueError, match="--method must be one of lora, full"):
        build_config(base, data, "qlora")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        build_config(tmp_path / "nope", data)
    with pytest.raises(ValueError, match="lora rank must be an integer >= 1, got 0"):
        build_config(base, data, "lora", overrides={"lora.rank": 0})
    with pytest.raises(ValueError, match="unknown key bogus"):
        build_config(base, data, "lora", overrides={"bogus": 1})
