"""The shipped recipes parse into TrainerConfig and keep the paper's setting (SPEC §5)."""

import json
from pathlib import Path

from sfgrpo.trainer.config import TrainerConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_sd35m_recipe_is_the_papers_setting():
    values = json.loads((RECIPES / "sd35m_8gpu.json").read_text())
    config = TrainerConfig.from_dict(values)  # unknown fields would raise
    assert (config.num_steps, config.guidance_scale, config.noise_level, config.sde_type) == (10, 4.5, 0.7, "sde")
    assert 16 <= config.group_size <= 24 and config.use_lora and (config.lora_rank, config.lora_alpha) == (32, 64.0)
    assert (config.learning_rate, config.clip_range, config.beta, config.max_grad_norm) == (3e-4, 1e-4, 0.04, 1.0)
    # batch sizes are global: they must split evenly over the 8 ranks the recipe is written for
    assert config.batch_size % 8 == 0 and config.train_batch_size % 8 == 0
    assert config.batch_size % config.train_batch_size == 0
    assert (config.eval_every, config.eval_num_steps) == (25, 40)  # Flow-GRPO's eval protocol
    # two AdamW steps per iteration, Flow-GRPO's cadence: 9 trained steps x (18 rows per rank in
    # minibatches of 6) = 27 forwards per rank, in windows of gradient_accumulation_steps
    trained_steps = config.num_steps - 1  # the last sde step has no noise to train
    forwards = trained_steps * (config.batch_size // 8) // (config.train_batch_size // 8)
    assert -(-forwards // config.gradient_accumulation_steps) == 2


def test_the_documented_single_gpu_command_is_a_valid_config():
    # docs/recipes.md: the 8-GPU recipe on one GPU with a smaller batch
    values = json.loads((RECIPES / "sd35m_8gpu.json").read_text())
    values.update(prompt_file=None, prompts="a cat,a dog", eval_prompt_file=None, eval_prompts="a cat",
                  prompts_per_iteration=2, group_size=16, train_batch_size=8, gradient_accumulation_steps=18,
                  rollout_batch_size=16)
    config = TrainerConfig.from_dict(values).validate()
    forwards = (config.num_steps - 1) * (config.batch_size // config.train_batch_size)
    assert forwards == 36 and -(-forwards // config.gradient_accumulation_steps) == 2
    doc = (RECIPES.parent / "docs" / "recipes.md").read_text()
    assert "--prompts-per-iteration 2 --group-size 16 --train-batch-size 8 --gradient-accumulation-steps 18" in doc
