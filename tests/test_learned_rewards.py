"""Learned rewards (CLIP score, PickScore, aesthetic head) on a tiny random CLIP saved offline, and
the reward spec grammar (path arguments, weighted mixtures)."""

import json

import pytest
import torch

from sfgrpo.rewards import get_reward
from sfgrpo.rewards.learned import ClipEmbedder, load_linear_head
from sfgrpo.models.tiny import save_tiny_clip

torch.set_num_threads(1)
pytest.importorskip("transformers")
PROMPTS = ["a cat", "a dog", "a cat", "7"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def images(count=4, size=32, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_clip_scores(clip_dir, pictures, prompts):
    """The plain transformers path: processor on PIL images, CLIPModel forward."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray((p.permute(1, 2, 0) * 255).round().byte().numpy()) for p in pictures]
    inputs = processor(text=list(prompts), images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return (image * text).sum(-1), float(model.logit_scale.detach().exp())


def test_clip_score_and_pickscore_match_transformers(clip_dir):
    pictures = (images() * 255).round() / 255  # 8-bit exact, as the PIL path sees them
    expected, logit_scale = reference_clip_scores(clip_dir, pictures, PROMPTS)
    clip = get_reward(f"clip_score:{clip_dir}?batch_size=3")
    torch.testing.assert_close(clip(pictures, PROMPTS), expected, atol=2e-3, rtol=0)
    pick = get_reward(f"pickscore:{clip_dir}")
    torch.testing.assert_close(pick(pictures, PROMPTS), logit_scale * expected, atol=2e-2, rtol=0)
    assert get_reward(f"clip_score:{clip_dir}?batch_size=3") is clip  # built once per spec


def test_model_is_loaded_once_and_lazily(clip_dir):
    embedder = ClipEmbedder.shared(str(clip_dir))
    assert ClipEmbedder.shared(str(clip_dir)) is embedder
    get_reward(f"clip_score:{clip_dir}?scale=2")  # building the reward loads nothing yet
    scores = get_reward(f"clip_score:{clip_dir}?scale=2")(images(2, size=48), ["a", "b"])  # resize path
    assert embedder.model is not None and not embedder.model.training and scores.shape == (2,)
    assert not any(p.requires_grad for p in embedder.model.parameters())


def test_grayscale_and_other_sizes_are_preprocessed(clip_dir):
    embedder = ClipEmbedder.shared(str(clip_dir))
    embedder._ready(torch.device("cpu"))
    assert embedder.pixel_values(torch.rand(2, 1, 8, 8)).shape == (2, 3, 32, 32)
    assert embedder.pixel_values(torch.rand(2, 3, 40, 64)).shape == (2, 3, 32, 32)


def test_aesthetic_head_on_clip_embeddings(clip_dir, tmp_path):
    torch.manual_seed(0)
    # LAION's MLP layout (keys layers.0/2/4/6/7, dropouts between) scaled down to a 16-d CLIP
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 8),
                              torch.nn.Dropout(0.2), torch.nn.Linear(8, 4), torch.nn.Dropout(0.1),
                              torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "head.pth")
    head = load_linear_head(str(tmp_path / "head.pth"))
    assert [layer.in_features for layer in head] == [16, 12, 8, 4, 2]
    reward = get_reward(f"aesthetic:{tmp_path / 'head.pth'}?clip={clip_dir}")
    pictures = images()
    embeddings = ClipEmbedder.shared(str(clip_dir)).image_embeddings(pictures, 32)
    with torch.no_grad():
        torch.testing.assert_close(reward(pictures, PROMPTS), mlp.eval()(embeddings).squeeze(-1))
    with pytest.raises(ValueError, match="clip="):
        get_reward(f"aesthetic:{tmp_path / 'head.pth'}")
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="768"):
        get_reward(f"aesthetic:{tmp_path / 'linear.pth'}?clip={clip_dir}")(pictures, PROMPTS)


def test_weighted_mixtures(clip_dir):
    pictures = images()
    bright, clip = get_reward("brightness")(pictures, PROMPTS), get_reward(f"clip_score:{clip_dir}")(pictures, PROMPTS)
    dark = get_reward("darkness")(pictures, PROMPTS)
    mixed = get_reward(f"0.7*clip_score:{clip_dir} + 0.3*brightness")(pictures, PROMPTS)
    torch.testing.assert_close(mixed, 0.7 * clip + 0.3 * bright)
    as_json = get_reward(json.dumps({f"clip_score:{clip_dir}": 0.7, "brightness": 0.3}))(pictures, PROMPTS)
    torch.testing.assert_close(as_json, mixed)
    as_dict = get_reward({"brightness": 2.0, "darkness": -1.0})(pictures, PROMPTS)
    torch.testing.assert_close(as_dict, 2.0 * bright - dark)
    # a product term inside a mixture, and a weight on both sides
    product = get_reward("0.5*brightness*darkness*2 + contrast")(pictures, PROMPTS)
    torch.testing.assert_close(product, bright * dark + get_reward("contrast")(pictures, PROMPTS))


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("0.5*sparkle + brightness")
    with pytest.raises(ValueError, match="bad reward term"):
        get_reward("0.5 + brightness")
    for spec in ("nan*brightness", "inf*brightness + darkness", {"brightness": float("nan")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            get_reward(spec)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_reward(f"clip_score:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown reward option"):
        get_reward(f"clip_score:{tmp_path}?batchsize=3")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_reward("{brightness: 1}")


def test_pickscore_scale_is_the_fp32_one_in_bf16(clip_dir):
    """The model may run in bf16, but `exp(logit_scale)` is the saved fp32 value: bf16 would round
    PickScore's log-scale ln(100) = 4.6052 to 4.59375 (a reward scale of 98.9)."""
    from transformers import CLIPModel

    saved = float(CLIPModel.from_pretrained(clip_dir).logit_scale.detach().exp())
    embedder = ClipEmbedder(str(clip_dir), None, "bfloat16")
    embedder._ready(torch.device("cpu"))
    assert next(embedder.model.parameters()).dtype == torch.bfloat16
    assert embedder.logit_scale == saved
