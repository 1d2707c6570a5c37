"""zenlm.train.state: atomic checkpoints (a half-written one is never the latest) and exact
resume after SIGKILL."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zenlm.train import COMPLETE_NAME, TrainConfig, Trainer, find_latest_checkpoint, write_dir_atomically

from .conftest import REPO, losses, run_config


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


def test_write_dir_atomically_replaces_whole_or_not_at_all(tmp_path):
    """The one atomic folder swap: a fill that fails leaves the old folder as it was and no
    temporary folder that could pass for a finished one."""
    final = tmp_path / "best"

    def fill(text):
        return lambda tmp: (tmp / "weights").write_text(text)

    write_dir_atomically(final, fill("one"))
    assert (final / "weights").read_text() == "one" and (final / COMPLETE_NAME).is_file()

    def dies(tmp):
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(final, dies)
    assert (final / "weights").read_text() == "one"
    assert not any((p / COMPLETE_NAME).exists() for p in tmp_path.iterdir() if p != final)
    write_dir_atomically(final, fill("two"))
    assert (final / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["best"]
