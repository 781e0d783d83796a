"""Awkward inputs to rewards and prompt files: clear errors or defined results, never silent."""

import pytest
import torch

from sfgrpo.models.prompts import read_prompt_file
from sfgrpo.rewards import RewardError, get_reward
from sfgrpo.rewards.http_client import HttpReward, images_to_png_base64


def test_nan_images_are_not_scored_over_http():
    images = torch.rand(3, 3, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(RewardError, match=r"NaN or inf values \(image\(s\) \[0\]\)"):
        images_to_png_base64(images)


@pytest.mark.parametrize("fragment", ["backoff=-1", "timeout=nan", "timeout=inf", "timeout=0"])
def test_bad_timing_options_fail_when_parsed(fragment):
    with pytest.raises(ValueError, match="bad options"):
        HttpReward.from_spec(f"http://127.0.0.1:9/score#{fragment}")


def test_a_url_with_whitespace_is_a_clear_spec_error_not_a_retried_request():
    with pytest.raises(ValueError, match="cannot contain whitespace"):
        get_reward("http://127.0.0.1:9/score + brightness")


def test_non_integer_response_ids_are_a_malformed_response():
    with pytest.raises(Exception) as caught:
        HttpReward._parse(b'{"ids": [[0], 1], "scores": [1, 2]}', [0, 1])
    assert "ids must be integers" in str(caught.value) and not isinstance(caught.value, TypeError)


def test_an_empty_batch_scores_to_an_empty_tensor():
    scores = get_reward("brightness")(torch.zeros(0, 3, 8, 8), [])
    assert scores.shape == (0,)


def test_prompt_files_split_only_on_newlines_strip_a_bom_and_ignore_suffix_case(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("\ufeffa cat\ncafé\x85 menu\r\nline\u2028sep\n", encoding="utf-8")
    assert read_prompt_file(str(text)) == ["a cat", "café\x85 menu", "line\u2028sep"]
    upper = tmp_path / "D.JSONL"
    upper.write_text('{"prompt": "a dog", "objects": ["dog"]}\n{"prompt": "x\u2028y"}\n', encoding="utf-8")
    prompts = read_prompt_file(str(upper))
    assert prompts == ["a dog", "x\u2028y"] and prompts[0].metadata == {"objects": ["dog"]}


def test_callers_cannot_change_the_cached_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a dog", "objects": ["dog"]}\n', encoding="utf-8")
    first = read_prompt_file(str(path))
    first.append("INJECTED")
    first[0].metadata["objects"].append("cat")
    again = read_prompt_file(str(path))
    assert again == ["a dog"] and again[0].metadata == {"objects": ["dog"]}


@pytest.mark.parametrize("images", [torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)])
def test_rewards_refuse_images_that_are_not_float_batches(images):
    with pytest.raises(RewardError, match=r"takes float images \[N, C, H, W\]"):
        get_reward("brightness")(images, ["a"] * images.shape[0])
