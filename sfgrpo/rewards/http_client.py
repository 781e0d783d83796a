"""A reward served by another process over HTTP (OCR models, VLM judges, anything too big or too
foreign for the training process), spec `http://host:port/path[#options]`.

Protocol (JSON both ways, one POST per chunk of samples):

    request  {"ids": [int, ...], "prompts": [str, ...], "images": [base64 PNG, ...]
              (, "metadata": [object, ...] when the prompts carry metadata: GenEval-style files)}
    response {"ids": [int, ...], "scores": [float | null, ...]}

`ids` are the samples' positions in the batch; the response is matched to the request by them
(a response without `ids` must list one score per requested sample, in request order). A `null`
score means "this sample failed": only those samples are sent again. Client options go in the
URL fragment, which is never sent to the server: `#timeout=60&retries=3&backoff=1&batch_size=16&workers=4`.

Failure handling: each chunk is retried on timeouts, refused/reset connections, HTTP 5xx, 408 and
429, malformed or mismatched responses, with exponential backoff (`backoff * 2**k` seconds). Other
4xx answers (a wrong path, a request the server rejects) fail at once. After the last retry a
`HttpRewardError` names the URL, the samples still unscored and the last error -- a batch is
never returned with samples missing, reordered or filled in.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sfgrpo.models.prompts import metadata_of
from sfgrpo.rewards.base import RewardError

RETRYABLE_STATUS = {408, 429}  # plus every 5xx


class HttpRewardError(RewardError):
    """The reward server could not score a batch (after retries, or it rejected the request)."""


class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection error, 5xx, malformed response)."""


def images_to_png_base64(images: Tensor) -> list[str]:
    """Images `[B, C, H, W]` in [0, 1] (C = 1 or 3) -> base64 PNG strings (8-bit)."""
    from PIL import Image

    values = images.detach().float()
    if not torch.isfinite(values).all():  # clamp keeps NaN and uint8 would make it 0: a silent score
        bad = (~torch.isfinite(values.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        raise RewardError(f"images hold NaN or inf values (image(s) {bad[:8]}); nothing was sent to score")
    pixels = (values.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    encoded = []
    for image in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def png_base64_to_images(encoded: Sequence[str]) -> Tensor:
    """Inverse of `images_to_png_base64`: float32 `[B, C, H, W]` in [0, 1] (C = 1 or 3)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for text in encoded:
        image = Image.open(io.BytesIO(base64.b64decode(text)))
        array = np.asarray(image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB"))
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class HttpReward:
    """`reward(images, prompts) -> [B]` scores from a reward server."""

    url: str
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # attempts after the first one
    backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    batch_size: int = 16  # samples per request
    workers: int = 4  # requests in flight at once

    @classmethod
    def from_spec(cls, spec: str) -> "HttpReward":
        url, _, fragment = spec.partition("#")
        kinds = {"timeout": float, "retries": int, "backoff": float, "batch_size": int, "workers": int}
        options = {}
        for key, value in urllib.parse.parse_qsl(fragment):
            if key not in kinds:
                raise ValueError(f"unknown option {key!r} in reward URL {spec!r}; known: {sorted(kinds)}")
            options[key] = kinds[key](value)
        reward = cls(url, **options)
        if (reward.batch_size < 1 or reward.workers < 1 or reward.retries < 0 or not 0 < reward.timeout < 1e6
                or not 0 <= reward.backoff < 1e6):
            raise ValueError(f"bad options in reward URL {spec!r}: batch_size and workers >= 1, retries >= 0, "
                             "0 < timeout < 1e6 s, 0 <= backoff < 1e6 s")
        return reward

    def __call__(self, images: Tensor, prompts: Sequence) -> Tensor:
        encoded = images_to_png_base64(images)  # once: retries resend the same bytes
        metadata = [metadata_of(p) for p in prompts]
        metadata = metadata if any(metadata) else None  # sent only when the prompts carry some
        prompts = [str(p) for p in prompts]
        chunks = [list(range(start, min(start + self.batch_size, len(prompts))))
                  for start in range(0, len(prompts), self.batch_size)]
        scores: list[float | None] = [None] * len(prompts)
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(chunks)))) as pool:
            futures = [pool.submit(self._score_chunk, chunk, encoded, prompts, metadata) for chunk in chunks]
            for chunk, future in zip(chunks, futures):
                for index, score in zip(chunk, future.result()):
                    scores[index] = score
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    # ------------------------------------------------------------------ one chunk, with retries
    def _score_chunk(self, indices: list[int], encoded: list[str], prompts: list[str],
                     metadata: list[dict] | None = None) -> list[float]:
        scored: dict[int, float] = {}
        pending, last_error = list(indices), "none"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._post(pending, encoded, prompts, metadata)
            except _Retryable as err:
                last_error = str(err)
                continue
            scored.update({i: s for i, s in answer.items() if s is not None})
            pending = [i for i in pending if i not in scored]
            if not pending:
                return [scored[i] for i in indices]
            last_error = f"the server returned no score for sample(s) {pending[:8]}"
        raise HttpRewardError(
            f"reward server {self.url}: {len(pending)} of {len(indices)} sample(s) of a chunk (batch positions "
            f"{pending[:8]}{'...' if len(pending) > 8 else ''}) still unscored after {self.retries + 1} attempt(s); "
            f"last error: {last_error}")

    def _post(self, indices: list[int], encoded: list[str], prompts: list[str],
              metadata: list[dict] | None = None) -> dict[int, float | None]:
        payload = {"ids": indices, "prompts": [prompts[i] for i in indices], "images": [encoded[i] for i in indices]}
        if metadata is not None:
            payload["metadata"] = [metadata[i] for i in indices]
        body = json.dumps(payload).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            if err.code >= 500 or err.code in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {err.code}: {detail}") from err
            raise HttpRewardError(f"reward server {self.url} rejected the request: HTTP {err.code}: {detail}") from err
        except http.client.InvalidURL as err:  # no retry mends a malformed URL
            raise HttpRewardError(f"invalid reward server URL {self.url!r}: {err}") from err
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                http.client.HTTPException) as err:
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err
        return self._parse(raw, indices)

    @staticmethod
    def _parse(raw: bytes, indices: list[int]) -> dict[int, float | None]:
        try:
            answer = json.loads(raw)
            scores = answer["scores"]
            ids = answer.get("ids", indices)
        except (ValueError, KeyError, TypeError) as err:
            raise _Retryable(f"malformed response ({err}): {raw[:200]!r}") from err
        if not isinstance(scores, list) or not isinstance(ids, list) or len(ids) != len(scores):
            raise _Retryable(f"malformed response: {len(scores) if isinstance(scores, list) else '?'} scores "
                             f"for {len(ids) if isinstance(ids, list) else '?'} ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise _Retryable(f"malformed response: ids must be integers, got {ids[:8]}")
        if not set(ids) <= set(indices) or len(set(ids)) != len(ids):
            raise _Retryable(f"response ids {ids[:8]} do not match the request's {indices[:8]}")
        result: dict[int, float | None] = {}
        for sample, score in zip(ids, scores):
            if score is None:
                result[sample] = None
            elif isinstance(score, (int, float)) and not isinstance(score, bool):
                result[sample] = float(score)
            else:
                raise _Retryable(f"score for sample {sample} is {score!r}, not a number")
        return result
