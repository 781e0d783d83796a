"""A small reference reward server: serves any reward spec over the protocol of
`sfgrpo.rewards.http_client` (used by the tests, and a template for OCR/VLM judges).

    python -m sfgrpo.rewards.http_server --reward jpeg_compressibility --port 8000
    sfgrpo train ... --reward http://127.0.0.1:8000/score

POST any path: `{"ids", "prompts", "images"[, "metadata"]}` -> `{"ids", "scores"}`; GET `/health` -> the reward's
name. Requests are handled on threads but scored one at a time (reward models are rarely
thread-safe); a failing reward answers HTTP 500 with the error, which the client retries.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from sfgrpo.models.prompts import Prompt
from sfgrpo.rewards.base import RewardFunction, get_reward
from sfgrpo.rewards.http_client import png_base64_to_images


class RewardRequestHandler(BaseHTTPRequestHandler):
    server: "RewardServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, {"reward": self.server.reward.name})
        else:
            self._send(404, {"error": f"no such path {self.path}; POST a batch, or GET /health"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(payload, dict) or not {"prompts", "images"} <= set(payload):
                raise ValueError("expected a JSON object with 'prompts' and 'images'")
        except ValueError as err:
            self._send(400, {"error": f"bad request: {err}"})
            return
        try:
            self._send(200, self.score(payload))
        except Exception as err:  # noqa: BLE001 - reported to the client, which retries
            self._send(500, {"error": f"{type(err).__name__}: {err}"})

    def score(self, payload: dict) -> dict:
        images = png_base64_to_images(payload["images"]).to(self.server.device)
        prompts = payload["prompts"]
        if payload.get("metadata") is not None:  # the prompts' metadata travels along (GenEval-style rewards)
            prompts = [Prompt(text, meta) for text, meta in zip(prompts, payload["metadata"])]
        with self.server.lock:
            scores = self.server.reward(images, prompts)
        return {"ids": payload.get("ids", list(range(len(scores)))), "scores": scores.tolist()}

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reward: RewardFunction, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                 handler=RewardRequestHandler, verbose: bool = False):
        super().__init__((host, port), handler)
        self.reward, self.device, self.verbose, self.lock = reward, torch.device(device), verbose, threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (timeout) closes its socket: not worth a traceback."""
        if self.verbose:
            super().handle_error(request, client_address)


def make_server(reward, host: str = "127.0.0.1", port: int = 0, device: str = "cpu", **kwargs) -> RewardServer:
    """A server for `reward` (a spec or a callable); port 0 picks a free port (see `.url`)."""
    return RewardServer(get_reward(reward), host, port, device, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfgrpo.rewards.http_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help="any reward spec sfgrpo understands")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="torch device the images are scored on")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = make_server(args.reward, args.host, args.port, args.device, verbose=args.verbose)
    print(f"serving reward {server.reward.name!r} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
