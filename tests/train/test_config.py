"""zenlm.train.config: errors name the key, YAML with dotted overrides and paths relative to the
file, and the CLI's one-line exit for a bad config."""
import subprocess
import sys

import pytest
import yaml

from zenlm.train import TrainConfig, apply_overrides, load_yaml, parse_overrides

from .conftest import TINY_MODEL, run_config


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


def test_load_yaml_and_overrides_name_the_file_and_key(tmp_path):
    """The one YAML reader (training recipes and ``zenlm finetune --config``) and the one override setter."""
    with pytest.raises(FileNotFoundError, match="no training config at"):
        load_yaml(tmp_path / "missing.yaml", what="training config")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="list.yaml must hold a mapping of keys, got list"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    data = {"optim": {"lr": 1.0}, "max_steps": 3}
    assert apply_overrides(data, {"optim.lr": 0.5, "data.seq_len": 8}) is data
    assert data == {"optim": {"lr": 0.5}, "max_steps": 3, "data": {"seq_len": 8}}
    with pytest.raises(ValueError, match="override --max_steps.x: max_steps is not a section"):
        apply_overrides(data, {"max_steps.x": 1})
