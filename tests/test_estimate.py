"""Training-cost estimator: FLOPs from the config's own accounting, the time/energy/cost
arithmetic done by hand, the BERT-base worked example, calibration on this machine, bad input."""
import json

import pytest

from zenlm.cli import main
from zenlm.config import TransformerConfig, estimate_costs
from zenlm.estimate import calibrate, estimate


def test_flops_follow_the_config_and_6nt():
    e = estimate(1e9, preset="gpt2-small", hardware="a100")
    per_token = estimate_costs(TransformerConfig.from_preset("gpt2-small"), 1)["training_flops_per_token"]
    assert e.flops == pytest.approx(per_token * 1e9) and e.attention_included
    p = estimate(2e9, params=1e8, hardware="h100")
    assert p.flops == pytest.approx(6 * 1e8 * 2e9) and not p.attention_included
    # a longer context costs more attention FLOPs per token
    short = estimate(1e9, preset="gpt2-small", hardware="a100", seq_len=128)
    assert short.flops < e.flops


def test_time_energy_cost_by_hand():
    e = estimate(1e10, params=1e9, hardware="custom", peak_flops=100e12, mfu=0.5, price_per_hour=2.0,
                 watts=300, devices=4)
    seconds = 6 * 1e9 * 1e10 / (4 * 100e12 * 0.5)  # 3e5 s
    assert e.seconds == pytest.approx(seconds)
    assert e.energy_kwh == pytest.approx(seconds / 3600 * 4 * 300 / 1000)
    assert e.cost == pytest.approx(seconds / 3600 * 4 * 2.0)


def test_bert_base_worked_example():
    # BERT-base pretraining: 3.3B words x 40 epochs ~ 1.32e11 tokens (Devlin et al.: 1M steps x 256 x 512)
    e = estimate(3.3e9 * 40, preset="bert-base", hardware="a100", devices=8)
    n = TransformerConfig.from_preset("bert-base").num_parameters()
    assert 100e6 < n < 120e6
    assert 0.8 * 6 * n * 1.32e11 < e.flops < 1.3 * 6 * n * 1.32e11
    assert 10 < e.seconds / 3600 < 40  # ~21 h on 8 A100s at 40% MFU
    assert e.cost == pytest.approx(e.seconds / 3600 * 8 * 1.80)


def test_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("ZENLM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of --preset or --params"):
        estimate(1e9, preset="tiny", params=1e6)
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        estimate(1e9, params=1e6, hardware="tpu")
    with pytest.raises(ValueError, match="tokens must be a positive number, got -1"):
        estimate(-1, params=1e6, hardware="a100")
    with pytest.raises(ValueError, match=r"mfu is a fraction of peak in \(0, 1\], got 40"):
        estimate(1e9, params=1e6, hardware="a100", mfu=40)
    with pytest.raises(ValueError, match="custom needs --peak-flops"):
        estimate(1e9, params=1e6, hardware="custom", mfu=0.3)
    with pytest.raises(ValueError, match="no CPU calibration"):
        estimate(1e9, params=1e6, hardware="cpu")
    assert main(["estimate", "--preset", "tiny", "--tokens", "1e9", "--hardware", "tpu"]) == 2
    assert main(["estimate", "--preset", "nope", "--tokens", "1e9", "--hardware", "a100"]) == 2


def test_cli_prints_the_estimate(capsys):
    assert main(["estimate", "--preset", "bert-base", "--tokens", "132e9", "--hardware", "a100",
                 "--devices", "8", "--price-per-hour", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "8 x a100" in out and "$2.50 per device-hour" in out and "wall time" in out


def test_calibration_on_this_machine(tmp_path, monkeypatch):
    # the trainer's measured MFU, cached, makes the CPU estimate of that same run reproduce its
    # measured throughput (seconds = tokens / tokens_per_s)
    monkeypatch.setenv("ZENLM_CACHE", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 400)
    model = {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "num_decoder_layers": 1, "max_position_embeddings": 33}
    cal = calibrate(model=model, steps=16, batch_size=4, seq_len=32, threads=1, data=str(text))
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["mfu"] == cal["mfu"] and 0 < cal["mfu"] < 1.5
    config = TransformerConfig.from_preset("tiny", **{k: v for k, v in model.items() if k != "preset"},
                                           vocab_size=4096)
    e = estimate(1e6, config=config, hardware="cpu", seq_len=33)
    assert e.mfu == cal["mfu"] and e.peak_flops == cal["peak_flops"]
    assert "measured by the trainer here" in e.mfu_source
