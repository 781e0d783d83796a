"""The Stepwise-Flow-GRPO / Flow-GRPO trainer: `TrainerConfig` (= the `sfgrpo train` flags) and
`Trainer` (one iteration = rollout, clean estimates, rewards, advantages, PPO update)."""

from sfgrpo.trainer.config import TrainerConfig
from sfgrpo.trainer.trainer import Trainer

__all__ = ["Trainer", "TrainerConfig"]
