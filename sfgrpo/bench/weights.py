"""The benchmark's backbone weights: built once per backbone per run and shared by every case x
implementation on it (`SharedWeights`)."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from sfgrpo.bench import configs


class SharedWeights:
    """One set of random weights per backbone for a whole benchmark run: built once (on the device,
    `configs.random_transformer`), then every case x implementation gets a fresh module (a meta shell,
    `configs.assign_tensors`: no copy, no init) over the same tensors, so each starts from identical
    weights with its own adapters, hooks, optimizer and trainer. Runs that only add adapters (LoRA)
    share the device tensors; a run that trains the base weights (full fine-tune, updated in place)
    gets them to itself while a host copy is kept for the next run. Holds one backbone at a time."""

    def __init__(self, log=None):
        self.key: tuple | None = None
        self.device_tensors: dict[str, Tensor] | None = None  # shared, never written
        self.host_tensors: dict[str, Tensor] | None = None  # master copy once a run trained the device one
        self.builds, self.build_seconds = 0, 0.0  # how many backbones were built, in how many seconds
        self.log = log or (lambda message: None)

    def transformer(self, name: str, device: str, dtype: torch.dtype, trains_base: bool = False,
                    seed: int = 0) -> nn.Module:
        key = (name, str(device), dtype, seed)
        if key != self.key:
            self.release()
            start = time.perf_counter()
            self.log(f"building backbone {name} ({str(dtype).removeprefix('torch.')}, random weights on {device})")
            module = configs.random_transformer(name, device, dtype, seed)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            self.device_tensors, self.key, self.builds = configs.tensors_of(module), key, self.builds + 1
            seconds = time.perf_counter() - start
            self.build_seconds += seconds
            self.log(f"backbone {name} built in {seconds:.1f} s "
                     f"({_count(configs.parameter_count(module))} parameters)")
            del module
        if self.device_tensors is None:  # the last run trained them: a fresh copy of the master
            self.device_tensors = {n: t.to(device, copy=True) for n, t in self.host_tensors.items()}
        tensors = self.device_tensors
        if trains_base:
            if self.host_tensors is None:
                self.host_tensors = {n: t.to("cpu", copy=True) for n, t in tensors.items()}
            self.device_tensors = None  # the run's own from now on (and freed with it)
        return configs.assign_tensors(configs.build_transformer(name, "meta", dtype), tensors)

    def release(self) -> None:
        self.key = self.device_tensors = self.host_tensors = None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
