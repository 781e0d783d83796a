"""The HTTP reward client against the reference server, including a slow, a failing, a partially
failing and a dead server: every sample comes back scored, in order, or a clear error."""

import threading
import time

import pytest
import torch

from sfgrpo.rewards import RewardError, get_reward
from sfgrpo.rewards.http_client import HttpReward, HttpRewardError, images_to_png_base64, png_base64_to_images
from sfgrpo.rewards.http_server import RewardRequestHandler, make_server

torch.set_num_threads(1)
FAST = "#timeout=2&retries=3&backoff=0.01&batch_size=2&workers=3"


def images(count=7, channels=3, seed=0):
    pixels = torch.rand(count, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (pixels * 255).round() / 255  # 8-bit exact: PNG round trip is lossless


class Served:
    """A reference server on a free port, on a background thread, with a request log."""

    def __init__(self, reward="brightness", handler=RewardRequestHandler):
        self.server = make_server(reward, handler=handler)
        self.server.requests = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return self.server.url

    def stop(self):
        if self.thread.is_alive():  # shutdown() waits for serve_forever: only call it once, while it runs
            self.server.shutdown()
            self.thread.join(timeout=5)
            self.server.server_close()


@pytest.fixture
def served(request):
    params = getattr(request, "param", {})
    server = Served(**params)
    yield server
    server.stop()


def logging_handler(fault):
    """A handler that records each request's ids and lets `fault(server, ids, attempt)` misbehave."""

    class Handler(RewardRequestHandler):
        def score(self, payload):
            with self.server.lock:
                attempt = len(self.server.requests)
                self.server.requests.append(list(payload["ids"]))
            answer = super().score(payload)
            return fault(self, answer, attempt)

    return Handler


def test_png_round_trip():
    for channels in (1, 3):
        pictures = images(3, channels)
        assert torch.equal(png_base64_to_images(images_to_png_base64(pictures)), pictures)


def test_scores_match_local_reward_in_order(served):
    pictures, prompts = images(), [str(i) for i in range(7)]
    reward = get_reward(served.url + FAST)
    torch.testing.assert_close(reward(pictures, prompts), get_reward("brightness")(pictures, prompts))


@pytest.mark.parametrize("served", [{"reward": "jpeg_compressibility"}], indirect=True)
def test_serves_any_registered_reward(served):
    pictures = images(5)
    expected = get_reward("jpeg_compressibility")(pictures, ["x"] * 5)
    torch.testing.assert_close(get_reward(served.url + FAST)(pictures, ["x"] * 5), expected)


def test_out_of_order_completion_keeps_order():
    def jitter(handler, answer, attempt):  # later chunks answer first
        time.sleep(0.05 * (4 - answer["ids"][0] // 2))
        return answer

    server = Served(handler=logging_handler(jitter))
    try:
        pictures = images(8)
        scores = get_reward(server.url + "#batch_size=2&workers=4")(pictures, ["p"] * 8)
        torch.testing.assert_close(scores, pictures.flatten(1).mean(1))
    finally:
        server.stop()


def test_slow_server_times_out_then_retries():
    def slow_first(handler, answer, attempt):
        if attempt == 0:
            time.sleep(1.0)
        return answer

    server = Served(handler=logging_handler(slow_first))
    try:
        pictures = images(2)
        reward = HttpReward.from_spec(server.url + "#timeout=0.3&retries=2&backoff=0.01&batch_size=2")
        torch.testing.assert_close(reward(pictures, ["a", "b"]), pictures.flatten(1).mean(1))
        assert len(server.server.requests) == 2
    finally:
        server.stop()


def test_server_errors_are_retried():
    def fail_twice(handler, answer, attempt):
        if attempt < 2:
            raise RuntimeError("GPU out of memory")
        return answer

    server = Served(handler=logging_handler(fail_twice))
    try:
        pictures = images(2)
        scores = get_reward(server.url + "#retries=3&backoff=0.01&batch_size=2")(pictures, ["a", "b"])
        torch.testing.assert_close(scores, pictures.flatten(1).mean(1))
        assert len(server.server.requests) == 3
    finally:
        server.stop()


def test_partial_failures_resend_only_the_failed_samples():
    seen = set()

    def drop_odd_once(handler, answer, attempt):  # odd samples fail the first time they are seen
        answer["scores"] = [None if i % 2 and i not in seen else s for i, s in zip(answer["ids"], answer["scores"])]
        seen.update(answer["ids"])
        return answer

    server = Served(handler=logging_handler(drop_odd_once))
    try:
        pictures = images(6)
        scores = get_reward(server.url + "#retries=2&backoff=0.01&batch_size=3&workers=1")(pictures, ["p"] * 6)
        torch.testing.assert_close(scores, pictures.flatten(1).mean(1))
        assert server.server.requests == [[0, 1, 2], [1], [3, 4, 5], [3, 5]]
    finally:
        server.stop()


def test_dead_server_raises_a_clear_error():
    server = Served()
    url = server.url
    server.stop()  # nothing listens on that port any more
    reward = get_reward(url + "#retries=2&backoff=0.01&timeout=1")
    with pytest.raises(HttpRewardError, match=r"still unscored after 3 attempt") as error:
        reward(images(3), ["a", "b", "c"])
    assert url in str(error.value) and isinstance(error.value, RewardError)


def test_server_dying_mid_batch_is_not_silently_dropped():
    def die_after_first(handler, answer, attempt):
        if attempt >= 1:
            raise RuntimeError("worker crashed")
        return answer

    server = Served(handler=logging_handler(die_after_first))
    try:
        reward = get_reward(server.url + "#retries=1&backoff=0.01&batch_size=2&workers=1")
        with pytest.raises(HttpRewardError, match=r"HTTP 500.*worker crashed"):
            reward(images(4), ["p"] * 4)
    finally:
        server.stop()


def test_client_errors_fail_without_retries():
    class WrongPath(RewardRequestHandler):
        def do_POST(self):  # noqa: N802
            self.server.requests.append(1)
            self._send(404, {"error": "no such judge"})

    server = Served(handler=WrongPath)
    try:
        start = time.perf_counter()
        with pytest.raises(HttpRewardError, match="rejected the request: HTTP 404.*no such judge"):
            get_reward(server.url + "#retries=5&backoff=10")(images(2), ["a", "b"])
        assert time.perf_counter() - start < 5 and server.server.requests == [1]
    finally:
        server.stop()


def test_bad_url_options():
    with pytest.raises(ValueError, match="unknown option"):
        get_reward("http://127.0.0.1:1/score#timeout=1&tries=3")


def test_trainer_iteration_with_served_and_learned_reward_mixture(tmp_path):
    """A real (tiny SD3) backbone trained on 0.5 * CLIP score + 0.5 * a served reward."""
    pytest.importorskip("transformers")
    from sfgrpo.models.tiny import save_tiny_clip, save_tiny_sd3
    from sfgrpo.trainer import Trainer, TrainerConfig

    clip_dir, sd3_dir = save_tiny_clip(tmp_path / "clip"), save_tiny_sd3(tmp_path / "sd3")
    server = Served("jpeg_compressibility")
    try:
        config = TrainerConfig(
            output_dir=str(tmp_path / "run"), backbone=str(sd3_dir), prompts="a cat,a dog",
            reward=f"0.5*clip_score:{clip_dir} + 0.5*{server.url}#batch_size=4&backoff=0.01",
            iterations=1, prompts_per_iteration=2, group_size=2, num_steps=3, progress=False, plots=False,
            resolution=16, max_sequence_length=8, guidance_scale=2.0,
        )
        record = Trainer(config).train_iteration()
        assert len(record["reward_by_step"]) == 4 and server.server.requests == []  # base handler keeps no log
    finally:
        server.stop()


def test_prompt_metadata_travels_to_the_server(monkeypatch):
    # GenEval-style prompts: the server's reward gets the same Prompt objects (text + metadata)
    from sfgrpo.models.prompts import Prompt, metadata_of
    from sfgrpo.rewards import base

    seen = []
    monkeypatch.setitem(base._REGISTRY, "counting_test", lambda imgs, prompts: seen.extend(prompts) or
                        torch.tensor([float(metadata_of(p).get("count", 0)) for p in prompts]))
    server = Served("counting_test")
    try:
        prompts = [Prompt("two cats", {"count": 2}), Prompt("a dog", {"count": 1}), Prompt("x", {"count": 5})]
        scores = get_reward(server.url + FAST)(images(3), prompts)
        assert scores.tolist() == [2.0, 1.0, 5.0]
        # chunks are scored concurrently: the server sees them in any order
        assert sorted((str(p), p.metadata["count"]) for p in seen) == sorted((str(p), p.metadata["count"]) for p in prompts)
        seen.clear()
        plain = get_reward(server.url + FAST)(images(2), ["a", "b"])  # no metadata: none sent
        assert plain.tolist() == [0.0, 0.0] and not any(isinstance(p, Prompt) for p in seen)
    finally:
        server.stop()
