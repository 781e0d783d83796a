"""torch.library custom ops of sfgrpo (namespace `sfgrpo`).

One module per op family: schema, fake (meta) impl, autograd formula and per-device kernels,
dispatching through `sfgrpo.backend.resolve_backend`. Importing this package registers them all.
"""

from sfgrpo.ops import advantages  # noqa: F401  (registers sfgrpo::gain_advantages, ...)
from sfgrpo.ops import gated_residual  # noqa: F401  (registers sfgrpo::gated_residual, ...)
from sfgrpo.ops import layer_norm_modulate  # noqa: F401  (registers sfgrpo::layer_norm_modulate)
from sfgrpo.ops import lora_linear  # noqa: F401  (registers sfgrpo::lora_linear)
from sfgrpo.ops import qk_norm_rope  # noqa: F401  (registers sfgrpo::qk_norm_rope, ...)
from sfgrpo.ops import sde_step  # noqa: F401  (registers sfgrpo::sde_step)
from sfgrpo.ops import rms_norm  # noqa: F401  (registers sfgrpo::rms_norm, sfgrpo::rms_norm_backward)
