"""The shipped digits backbone, its classifier reward and the reward registry."""

import sys
import types

import pytest
import torch

from sfgrpo.models import load_digits_backbone, load_digits_data
from sfgrpo.models.digit_classifier import DigitClassifier
from sfgrpo.models.train_digits import sample
from sfgrpo.rewards import RewardError, get_reward, list_rewards

torch.set_num_threads(1)


def test_shipped_classifier_recognises_the_dataset():
    images, labels = load_digits_data()
    classifier = DigitClassifier.load()
    accuracy = (classifier((images + 1) / 2).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.97


def test_shipped_backbone_draws_the_requested_digits():
    model = load_digits_backbone()
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 700_000
    labels = torch.arange(10).repeat(3)
    with torch.no_grad():
        images = sample(model, labels, sde_type="ode", noise_level=0.0, cfg=1.0, seed=0)
    accuracy = (DigitClassifier.load()(images).argmax(-1) == labels).float().mean().item()
    assert images.shape == (30, 1, 8, 8) and accuracy >= 0.9


def test_builtin_rewards_return_one_finite_score_per_image():
    images, prompts = torch.rand(5, 1, 8, 8), ["0", "1", "2", "3", "4"]
    for name in list_rewards():
        scores = get_reward(name)(images, prompts)
        assert scores.shape == (5,) and torch.isfinite(scores).all(), name
    assert {"brightness", "darkness", "contrast", "digit", "jpeg_compressibility"} <= set(list_rewards())


def test_digit_reward_prefers_the_requested_class():
    images, labels = load_digits_data()
    clean = (images[:20] + 1) / 2
    right = get_reward("digit")(clean, [str(int(l)) for l in labels[:20]])
    wrong = get_reward("digit")(clean, [str((int(l) + 1) % 10) for l in labels[:20]])
    assert right.mean() > 0.8 and wrong.mean() < 0.1


def test_product_rewards_gate_the_style_with_the_classifier():
    images, prompts = torch.rand(4, 1, 8, 8), ["1", "2", "3", "4"]
    gated = get_reward("digit*brightness")(images, prompts)
    torch.testing.assert_close(gated, get_reward("digit")(images, prompts) * get_reward("brightness")(images, prompts))


def test_user_reward_from_module_function():
    module = types.ModuleType("my_rewards_for_test")
    module.ones = lambda images, prompts: [1.0] * images.shape[0]
    module.nan = lambda images, prompts: [float("nan")] * images.shape[0]
    sys.modules[module.__name__] = module
    try:
        assert get_reward("my_rewards_for_test:ones")(torch.rand(3, 1, 8, 8), ["1"] * 3).tolist() == [1.0] * 3
        with pytest.raises(RewardError, match="NaN"):
            get_reward("my_rewards_for_test:nan")(torch.rand(3, 1, 8, 8), ["1"] * 3)
    finally:
        del sys.modules[module.__name__]


def test_bad_reward_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("sparkle")
    with pytest.raises(ValueError, match="cannot load reward function"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="prompts"):
        get_reward("brightness")(torch.rand(3, 1, 8, 8), ["1"])
