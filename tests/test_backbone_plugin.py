"""Custom backbones: the `Backbone` protocol, `check_backbone`, and `backbone="module:factory"`.

The factories below are loaded by name, `test_backbone_plugin:make_backbone`, the way a user's
module is: conftest.py puts tests/ on sys.path.
"""

import math
import zlib

import pytest
import torch
from torch import nn

from sfgrpo.models import Backbone, DigitsBackbone, check_backbone, load_backbone
from sfgrpo.models.digits import TINY_CONFIG
from sfgrpo.trainer import Trainer, TrainerConfig

torch.set_num_threads(1)

SPEC = "test_backbone_plugin:make_backbone"


class TinyVelocityNet(nn.Module):
    """What trains: an MLP from (latent, t, prompt embedding) to a velocity. Not a diffusers model."""

    def __init__(self, latent_numel: int, embed_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_numel + 1 + embed_dim, width), nn.SiLU(),
                                 nn.Linear(width, latent_numel))

    def forward(self, x, t, embedding):
        return self.net(torch.cat([x.flatten(1), t[:, None], embedding], dim=1)).reshape(x.shape)


class TinyFlow(nn.Module):
    """A backbone written from the protocol alone: prompts hashed to learned embeddings (the
    condition is a plain tensor), 2x4x4 latents, decode = sigmoid to 3 channels, its own grid."""

    def __init__(self, prompt_slots: int = 16, embed_dim: int = 8, shape=(2, 4, 4)):
        super().__init__()
        self.prompt_slots, self.shape = prompt_slots, tuple(shape)
        self.embedding = nn.Embedding(prompt_slots + 1, embed_dim)  # the last slot is the CFG null prompt
        self.transformer = TinyVelocityNet(math.prod(shape), embed_dim)
        self.config_seen = "not called with a config"

    @property
    def latent_shape(self):
        return self.shape

    @property
    def device(self):
        return self.embedding.weight.device

    def encode_prompts(self, prompts):
        slots = [zlib.crc32(str(p).encode()) % self.prompt_slots for p in prompts]
        return self.embedding(torch.tensor(slots, dtype=torch.int64, device=self.device))

    def null_condition(self, batch):
        return self.embedding(torch.full((batch,), self.prompt_slots, dtype=torch.int64, device=self.device))

    def velocity(self, x, t, cond):
        return self.transformer(x, t, cond)  # looked up at each call: the trainer swaps it (DDP, KL copy)

    def decode(self, latents):
        return torch.sigmoid(latents.float().mean(dim=1, keepdim=True)).expand(-1, 3, -1, -1)

    def sampling_sigmas(self, num_steps):  # optional member: a linear grid instead of SD3's shifted one
        return torch.linspace(1.0, 0.0, num_steps + 1)


def make_backbone(config):
    model = TinyFlow().eval()
    model.config_seen = config
    return model


def make_backbone_without_config():
    return TinyFlow().eval()


def make_backbone_with_a_default(config=None):
    return make_backbone(config)


def make_two_argument_backbone(config, extra):
    return TinyFlow().eval()


class Incomplete:
    """velocity and decode only, and a transformer that is not a module."""

    transformer = "weights.safetensors"

    def velocity(self, x, t, cond):
        return x

    def decode(self, latents):
        return latents


def make_incomplete():
    return Incomplete()


NOT_A_FACTORY = 42


def plugin_config(tmp_path, **overrides) -> TrainerConfig:
    values = {"output_dir": str(tmp_path / "run"), "backbone": SPEC, "reward": "brightness",
              "prompts": "a cat,a dog,3", "iterations": 1, "prompts_per_iteration": 2, "group_size": 3, "num_steps": 4,
              "progress": False, "plots": False}
    values.update(overrides)
    return TrainerConfig(**values)


def test_check_backbone_names_every_missing_member():
    with pytest.raises(TypeError) as raised:
        check_backbone(Incomplete())
    message = str(raised.value)
    missing = message.split("missing ", 1)[1].split(";", 1)[0].split(", ")
    assert missing == ["encode_prompts", "null_condition", "latent_shape", "device", "to", "requires_grad_"]
    assert "transformer is a str, not a torch.nn.Module" in message
    assert not isinstance(Incomplete(), Backbone)
    # the built-in backbone and the plug-in above implement the protocol
    for model in (load_backbone("tiny-random"), TinyFlow()):
        check_backbone(model)
        assert isinstance(model, Backbone)


def test_check_backbone_checks_what_the_protocol_declares():
    from sfgrpo.models import protocol

    declared = {name for name, value in vars(Backbone).items()
                if not name.startswith("_") and (callable(value) or isinstance(value, property))}
    assert set(protocol.REQUIRED) == declared | set(Backbone.__annotations__)


def test_explicit_subclasses_of_the_protocol_do_not_pass_with_its_stubs():
    class OnlyStubs(Backbone):
        transformer = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="missing encode_prompts, null_condition, velocity, decode, latent_shape"):
        check_backbone(OnlyStubs())


def test_check_backbone_does_not_evaluate_properties():
    class NoParametersYet(TinyFlow):
        @property
        def device(self):
            raise RuntimeError("evaluated")

    check_backbone(NoParametersYet())


def test_a_plugin_backbone_trains_a_stepwise_iteration_on_policy(tmp_path):
    # CFG and the KL to a frozen copy of the transformer (which the trainer swaps in) included
    config = plugin_config(tmp_path, mode="stepwise", lookahead_steps=2, guidance_scale=2.0, beta=0.01)
    trainer = Trainer(config)
    model = trainer.model
    assert type(model).__name__ == "TinyFlow" and model.config_seen is config
    assert trainer.steps.t == torch.linspace(1.0, 0.0, 5)[:-1].tolist()  # its sampling_sigmas was used
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = trainer.train_iteration()
    assert record["ratio_mean"] == 1.0  # re-scored with the rollout's weights: exactly on-policy
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    assert len(record["reward_by_step"]) == 5
    assert trainer.last_images.shape == (5, 6, 3, 4, 4)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("transformer.") for n in moved)  # only .transformer trains
    assert not any(p.requires_grad for p in model.embedding.parameters())


def test_factories_get_the_config_when_they_take_one_and_run_seeded():
    state = torch.get_rng_state()
    a = load_backbone("test_backbone_plugin:make_backbone_without_config", seed=3)
    b = load_backbone("test_backbone_plugin:make_backbone_without_config", seed=3)
    c = load_backbone("test_backbone_plugin:make_backbone_without_config", seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    assert a.config_seen == "not called with a config"
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)
    assert load_backbone(SPEC, config="the config").config_seen == "the config"
    # one positional argument accepted, even optional: the config is passed
    assert load_backbone("test_backbone_plugin:make_backbone_with_a_default", config="the config").config_seen \
        == "the config"


@pytest.mark.parametrize("spec,error,words", [
    ("no_such_module_for_sfgrpo:make", ValueError, "cannot import module 'no_such_module_for_sfgrpo'"),
    ("test_backbone_plugin:no_such_factory", ValueError, "has no attribute 'no_such_factory'"),
    ("test_backbone_plugin:NOT_A_FACTORY", TypeError, "(int) is not callable"),
    ("test_backbone_plugin:make_incomplete", TypeError, "is not an sfgrpo backbone: missing encode_prompts"),
    ("test_backbone_plugin:make_two_argument_backbone", TypeError, "must take the run's TrainerConfig"),
])
def test_bad_factory_specs_are_clear_errors(tmp_path, spec, error, words):
    with pytest.raises(error) as raised:
        Trainer(plugin_config(tmp_path, backbone=spec))
    assert f"backbone {spec!r}" in str(raised.value) and words in str(raised.value)


@pytest.mark.parametrize("spec", ["C:\\no\\such\\checkpoint", "runs/a:b", "no such:thing"])
def test_paths_that_do_not_exist_are_not_factory_specs(spec):
    with pytest.raises(ValueError, match="unknown backbone .* no such directory"):
        load_backbone(spec)


def test_a_directory_named_like_a_factory_spec_is_loaded_as_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        saved = DigitsBackbone(TINY_CONFIG)
    saved.save(SPEC)  # a relative directory named "test_backbone_plugin:make_backbone"
    loaded = load_backbone(SPEC)
    assert isinstance(loaded, DigitsBackbone)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    saved.save(tmp_path / "runs:1")  # an absolute path with a colon
    assert isinstance(load_backbone(str(tmp_path / "runs:1")), DigitsBackbone)
    # a directory without weights gets the directory's error, not the factory's result
    (tmp_path / "test_backbone_plugin:make_backbone_without_config").mkdir()
    with pytest.raises(FileNotFoundError, match="no digits_backbone.safetensors"):
        load_backbone("test_backbone_plugin:make_backbone_without_config")
