"""Reward functions: `reward(images, prompts) -> [B]` scores, images `[B, C, H, W]` in [0, 1].

`get_reward(spec)` resolves a spec:
- a registered name (`list_rewards()`): model-free ones (`brightness`, `darkness`, `contrast`,
  `sharpness`, `symmetry`, `jpeg_compressibility`) and the built-in digit classifier (`digit`);
- a product of names, `digit*darkness`: the classifier gates the style reward, so the model cannot
  win by destroying the digit;
- `package.module:function`, any user function with the same signature.

Every call goes through `RewardFunction`, which checks the output: one finite score per image, or a
clear error naming the reward.
"""

from sfgrpo.rewards.base import RewardFunction, RewardError, get_reward, list_rewards, register_reward
from sfgrpo.rewards import builtin  # noqa: F401  (registers the built-in rewards)

__all__ = ["RewardFunction", "RewardError", "get_reward", "list_rewards", "register_reward"]
