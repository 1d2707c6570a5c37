"""zenlm.train.distributed: torchrun with 2 processes (gloo) equals one process on the same
global batch, under DDP and FSDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zenlm.checkpoint import load_weights
from zenlm.train import TrainConfig, Trainer

from .conftest import REPO, losses, run_config


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
