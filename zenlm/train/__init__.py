"""Training: ``TrainConfig`` → ``Trainer`` → checkpoints, for every objective, on one process or
many under torchrun.

  config.py       TrainConfig and its sections, YAML loading, ``--key.sub VALUE`` overrides
  loop.py         Trainer (set-up, then ``train()``: optimizer step, log line, evaluation,
                  checkpoint) and ``train(config)``; the schedule and the optimizer
  distributed.py  torchrun process group, DDP/FSDP wrapping, the collectives the loop needs
  state.py        the run folder: atomic checkpoint folders, trainer_state.pt, latest,
                  keep-last-N, best, metrics.jsonl, loss.png, RNG states

Every name is importable from here: ``from zenlm.train import Trainer, TrainConfig``.
"""
from .config import (ATTENTION_BACKENDS, SCHEDULES, OptimConfig, TokenizerSpec, TrainConfig, apply_overrides,
                     load_yaml, parse_overrides)
from .distributed import Dist, init_distributed
from .loop import (Trainer, enable_activation_checkpointing, lr_lambda, make_optimizer, measure_peak_flops,
                   run_trainer, train)
from .state import COMPLETE_NAME, STATE_NAME, find_latest_checkpoint, write_dir_atomically, write_model_folder

__all__ = ["TrainConfig", "OptimConfig", "TokenizerSpec", "Trainer", "train", "parse_overrides", "lr_lambda",
           "make_optimizer", "find_latest_checkpoint", "measure_peak_flops", "enable_activation_checkpointing",
           "run_trainer", "load_yaml", "apply_overrides", "write_dir_atomically", "write_model_folder", "Dist",
           "init_distributed", "SCHEDULES", "ATTENTION_BACKENDS", "STATE_NAME", "COMPLETE_NAME"]
