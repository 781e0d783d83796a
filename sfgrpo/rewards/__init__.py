"""Reward functions: `reward(images, prompts) -> [B]` scores, images `[B, C, H, W]` in [0, 1].

`get_reward(spec)` resolves a spec:
- a registered name (`list_rewards()`): model-free ones (`brightness`, `darkness`, `contrast`,
  `sharpness`, `symmetry`, `jpeg_compressibility`) and the built-in digit classifier (`digit`);
- a product of names, `digit*darkness`: the classifier gates the style reward, so the model cannot
  win by destroying the digit;
- `package.module:function`, any user function with the same signature;
- learned rewards from local model directories, `clip_score:/path`, `pickscore:/path`,
  `aesthetic:/head.pth?clip=/path` (`sfgrpo.rewards.learned`);
- a reward served over HTTP by another process, `http://host:port/path` (`sfgrpo.rewards.http_client`);
- weighted mixtures, `0.7*pickscore:/p + 0.3*aesthetic:/h?clip=/c` or `{"pickscore:/p": 0.7, ...}`.

Every call goes through `RewardFunction`, which checks the output: one finite score per image, or a
clear error naming the reward.
"""

from sfgrpo.rewards.base import (
    RewardError,
    RewardFunction,
    get_reward,
    list_reward_factories,
    list_rewards,
    register_reward,
    register_reward_factory,
)
from sfgrpo.rewards import builtin, learned  # noqa: F401  (register the built-in and learned rewards)

__all__ = ["RewardFunction", "RewardError", "get_reward", "list_reward_factories", "list_rewards", "register_reward",
           "register_reward_factory"]
