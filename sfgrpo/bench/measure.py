"""What the benchmark measures besides wall time: time inside the backbone, peak memory, host syncs."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
import warnings

import torch


class BackboneClock:
    """Time spent inside the transformer's forward and backward, so the share of an iteration spent
    outside the backbone can be reported. Forward: module hooks. Backward: from the moment the
    gradient of the transformer's output arrives to the last gradient accumulated into one of its
    parameters (module backward hooks fire too early when the inputs need no gradient).

    On CPU the hooks read the wall clock. On CUDA (`device_events=True`) they record CUDA events
    on the current stream instead and `take()` sums the GPU time between each pair after one
    synchronisation: the hooks never wait for the device, so the measured iteration keeps the
    overlap of host and GPU work that it has without the clock (synchronising around every
    forward would expose all host time outside the backbone, sfgrpo's and the reference ops'
    alike, and add a pipeline drain per forward)."""

    def __init__(self, module: torch.nn.Module, device_events: bool = False):
        self.device_events = device_events and torch.cuda.is_available()
        self._spans: list[tuple] = []  # (start, end) marks: perf_counter floats or CUDA events
        self._forward_start = None
        self._backward = None  # [start mark, end mark or None] of the backward in progress
        self.watch(module)
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._gradient_done)

    def watch(self, module: torch.nn.Module) -> None:
        """Counts the forward of another network too (the frozen KL reference of a full fine-tune)."""
        module.register_forward_pre_hook(self._forward_begins)
        module.register_forward_hook(self._forward_ends)

    def _mark(self, reuse=None):
        """A point in time: the wall clock, or a CUDA event recorded on the current stream (`reuse`:
        an event of this clock to record again rather than a new one)."""
        if not self.device_events:
            return time.perf_counter()
        event = reuse if reuse is not None else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _forward_begins(self, *_):
        self._forward_start = self._mark()

    def _forward_ends(self, _module, _inputs, output):
        if self._forward_start is not None:
            self._spans.append((self._forward_start, self._mark()))
            self._forward_start = None
        tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(self._backward_begins)

    def _backward_begins(self, _grad):
        self._close()
        self._backward = [self._mark(), None]

    def _gradient_done(self, _parameter):
        # one event per backward, recorded again at each parameter's gradient: the last one counts
        if self._backward is not None:
            self._backward[1] = self._mark(reuse=self._backward[1])

    def _close(self):
        if self._backward is not None and self._backward[1] is not None:
            self._spans.append(tuple(self._backward))
        self._backward = None

    def take(self) -> float:
        """Seconds inside the backbone since the last `take()` (one device synchronisation on CUDA)."""
        self._close()
        spans, self._spans = self._spans, []
        if not self.device_events:
            return sum(end - start for start, end in spans)
        if spans:
            torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in spans) / 1000.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(megabytes, what was measured): CUDA's max_memory_allocated since the last reset, or on CPU the
    process's resident-set high-water mark (it never goes down, so later cases include earlier ones)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "cpu_rss_high_water"


def is_sync_warning(message) -> bool:
    """Whether a warning is torch's report of one synchronising CUDA operation (sync debug mode
    "warn"), not its one-time notice that "Synchronization debug mode is a prototype feature",
    which the first counted call of a process also receives."""
    return "called a synchronizing cuda operation" in str(message).lower()


class SyncCounter:
    """Counts host-device synchronisations (CUDA only) by turning on torch's sync debug mode in
    "warn" and counting its warnings. `count()` wraps a callable; the counts add up in `.total`."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.total = 0

    @contextlib.contextmanager
    def counting(self):
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        self.total += sum(is_sync_warning(w.message) for w in caught)

    def wrap(self, function):
        def counted(*args, **kwargs):
            with self.counting():
                return function(*args, **kwargs)
        return counted

    def take(self) -> int | None:
        if not self.enabled:
            return None
        total, self.total = self.total, 0
        return total
