"""sfgrpo: kernel-accelerated Stepwise-Flow-GRPO for flow-matching image models.

Layers (every import points down): reference math and backend selection at the bottom, custom ops
above them, the functional API, then trainer / compat / CLI. See ARCHITECTURE in the docs.
"""

from sfgrpo._version import __version__
from sfgrpo import functional, reference, schedules
from sfgrpo.backend import available_backends, resolve_backend
from sfgrpo.functional import (gain_advantages, gated_residual, gated_residual_layer_norm_modulate, group_advantages,
                               layer_norm_modulate, lora_linear, ode_lookahead, ppo_loss, qk_norm_rope, rms_norm,
                               sde_step)
from sfgrpo.trainer import Trainer, TrainerConfig

__all__ = [
    "__version__",
    "functional",
    "reference",
    "schedules",
    "available_backends",
    "resolve_backend",
    "gain_advantages",
    "gated_residual",
    "gated_residual_layer_norm_modulate",
    "group_advantages",
    "layer_norm_modulate",
    "lora_linear",
    "ode_lookahead",
    "ppo_loss",
    "qk_norm_rope",
    "rms_norm",
    "sde_step",
    "Trainer",
    "TrainerConfig",
]
