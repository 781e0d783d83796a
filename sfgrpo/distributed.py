"""Multi-process training: the torchrun environment, the split of the global batch over ranks,
stateless noise, DDP / FSDP2 wrapping and cross-rank reductions.

The contract: a run on W processes computes what one process computes on the same global batch.

- The global batch of an iteration is `prompts_per_iteration x group_size` trajectories; row j
  belongs to group j // group_size. Rank r holds a contiguous slice of rows (`shard_rows`), so a
  group may span ranks, and advantages are computed on the all-gathered rewards.
- Noise is a pure function of indices, never of a generator's history: the shared initial noise
  of group g is drawn from (seed, iteration, g), the SDE noise of trajectory j at step k from
  (seed, iteration, j, k). Every rank holding members of a group draws the same initial noise,
  every trajectory gets its own step noise, and the union over ranks is exactly what one process
  draws (Flow-GRPO derives noise from per-rank generator state instead: with the same seed on
  every rank, ranks repeat each other's trajectories). Stateless noise also makes resume exact
  with any world size.
- The loss of a rank is scaled so that the gradient averaged by DDP / FSDP equals the gradient of
  the mean over the global batch (`loss_scale`), also when ranks hold unequal numbers of rows.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")


# ====================================================================== process group
@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits. With no process group: rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistributedContext:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return DistributedContext()
    rank = torch.distributed.get_rank()
    return DistributedContext(rank, torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", _local_rank(rank))))


def _local_rank(rank: int) -> int:
    """Without torchrun's LOCAL_RANK (a group started by another launcher): the node's GPUs in
    rank order, so that a second node's ranks still name GPUs it has."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank % gpus if gpus else rank


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_from_env(device: str = "cpu", timeout_minutes: float | None = None) -> DistributedContext:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL for CUDA, gloo for CPU, and binds this process to its GPU.
    `timeout_minutes`: how long a collective may wait for the slowest process (None: torch's
    default, 10 minutes for NCCL -- while rank 0 alone writes a whole checkpoint, the others wait
    in a barrier). A no-op without torchrun or when a group already exists."""
    if launched_by_torchrun() and not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # The store torchrun hands out outlives a restart of the worker group (--max-restarts), and
        # a restarted group reading the dead workers' keys (gloo's peer addresses) fails to connect.
        # Namespacing the keys by restart count gives every attempt a clean slate.
        rendezvous = torch.distributed.rendezvous("env://")
        store, rank, world_size = next(rendezvous)
        rendezvous.close()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = torch.distributed.PrefixStore(f"sfgrpo/attempt-{attempt}/", store)
        timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                             timeout=timeout)
    return context()


def shutdown() -> None:
    """Destroys the default group, then collects what still refers to its store and connections:
    left to the interpreter's exit, their C++ destructors ran after Python had finalised and a
    restarted torchrun worker sometimes aborted there ("terminate called without an active
    exception", exit -6), which torchrun counts as a failed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        gc.collect()


def local_device(device: str, ctx: DistributedContext) -> torch.device:
    """`cuda` means this process's own GPU (cuda:LOCAL_RANK) once several processes share a node."""
    dev = torch.device(device)
    if dev.type == "cuda" and ctx.enabled:
        if dev.index is not None and dev.index != ctx.local_rank:
            # every process would build on that one GPU, and NCCL refuses two ranks on one device
            raise ValueError(f"device={device!r} names one GPU, but this is process {ctx.rank} of "
                             f"{ctx.world_size} (local rank {ctx.local_rank}); use device='cuda': each process "
                             "then takes its own GPU, cuda:LOCAL_RANK")
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    return dev


def barrier() -> None:
    if context().enabled:
        torch.distributed.barrier()


# ====================================================================== the global batch
def shard_rows(total: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous rows of `total`: shares differ by at most one, earlier ranks first."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def loss_scale(local_rows: int, total_rows: int, world_size: int) -> float:
    """Factor on a rank's mean loss so that DDP / FSDP's gradient *average* over ranks is the
    gradient of the mean over the global batch: (1/W) sum_r W n_r/N grad(mean_r) = grad(mean).
    Exactly 1.0 with equal shares (and for one process)."""
    return local_rows * world_size / total_rows


def derive_seed(*keys) -> int:
    """A 63-bit seed from a tuple of keys, stable across processes, platforms and Python versions
    (unlike `hash`)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TrajectoryNoise:
    """The noise of one iteration as a pure function of (seed, iteration, global indices).

    One small generator per drawn row: cheap next to a network call, and it makes the noise of a
    row independent of which rank draws it and of how many rows it draws with.
    """

    def __init__(self, seed: int, iteration: int, device: torch.device):
        self.seed, self.iteration, self.device = seed, iteration, torch.device(device)

    def _draw(self, shape: Sequence[int], *key) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.iteration, *key))
        return torch.randn(tuple(shape), generator=generator, device=self.device, dtype=torch.float32)

    def initial(self, group_ids: Sequence[int], shape: Sequence[int]) -> Tensor:
        """`[len(group_ids), *shape]`: the shared starting noise of each row's group."""
        per_group = {g: self._draw(shape, "initial", g) for g in dict.fromkeys(group_ids)}
        return torch.stack([per_group[g] for g in group_ids])

    def initial_per_trajectory(self, rows: Sequence[int], shape: Sequence[int]) -> Tensor:
        """`[len(rows), *shape]`: a starting noise of its own for each global trajectory."""
        return torch.stack([self._draw(shape, "initial-trajectory", row) for row in rows])

    def step(self, rows: Sequence[int], step: int, shape: Sequence[int]) -> Tensor:
        """`[len(rows), *shape]`: the SDE noise (eps) of each global trajectory at sampling step `step`."""
        return torch.stack([self._draw(shape, "step", row, step) for row in rows])


# ====================================================================== cross-rank reductions
def gather_rows(tensor: Tensor) -> Tensor:
    """All ranks' rows of `tensor`, in rank order (= global row order); ranks may hold different
    numbers of rows. The identity for one process."""
    if not context().enabled:
        return tensor
    from sfgrpo.gather import gather_batch

    ids = torch.zeros(tensor.shape[0], dtype=torch.int64, device=tensor.device)
    return gather_batch(tensor, ids).rewards


def weighted_mean_over_ranks(value: Tensor, weight: float) -> Tensor:
    """sum_r weight_r * value_r (weights sum to 1 over ranks): the global mean of per-rank means."""
    if not context().enabled:
        return value
    value = value * weight
    torch.distributed.all_reduce(value)
    return value


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over ranks (wall times: the slowest rank sets the pace)."""
    if not context().enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


# ====================================================================== model wrapping
def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def enable_activation_checkpointing(transformer: nn.Module) -> None:
    """Recompute each transformer block in the backward instead of storing its activations.
    diffusers models have it built in; anything else gets torch's checkpoint wrapper per block."""
    if getattr(transformer, "_supports_gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for blocks in _block_lists(transformer):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def _block_lists(transformer: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks: every ModuleList child (SD3: transformer_blocks; FLUX: transformer_blocks
    and single_transformer_blocks)."""
    return [child for child in unwrap(transformer).children() if isinstance(child, nn.ModuleList)]


def shard_fsdp(transformer: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: each transformer block is its own unit (parameters all-gathered just before the block
    runs, freed after), then the root takes the rest (embeddings, norms, projections).
    `compute_dtype` (bf16 mixed precision): parameters are all-gathered and used in that dtype while
    the shards (fp32 master weights) and the gradient reduction stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # the public FSDP2 API (torch >= 2.6)
        raise RuntimeError(f"distributed='fsdp' needs FSDP2 (torch >= 2.6; this is torch {torch.__version__}); "
                           "use distributed='ddp'") from err

    mesh = init_device_mesh(device.type, (context().world_size,))
    options = {}
    if compute_dtype is not None:
        # inputs are not cast: the root unit would round every float keyword argument to bf16,
        # SD3's timestep 1000 t included (to multiples of 4 above 512); autocast, which bf16 mixed
        # precision turns on, casts what the matmuls read, as on one GPU and under DDP
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    for blocks in _block_lists(transformer):
        for block in blocks:
            fully_shard(block, mesh=mesh, **options)
    fully_shard(transformer, mesh=mesh, **options)
    return transformer


def reshard(module: nn.Module) -> None:
    """Puts every FSDP2 unit of `module` back in its sharded state. The root unit keeps its
    parameters unsharded after a forward that no backward follows (an evaluation), and the
    optimizer and checkpoints expect the sharded parameters registered. No-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without the public FSDP2 API cannot have FSDP2 units either
        return
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def wrap_ddp(transformer: nn.Module, device: torch.device) -> nn.Module:
    # No per-forward buffer broadcast: the backbone's buffers (position embeddings) are constants,
    # and without it a no-grad forward (rollout, look-ahead, reference) is free of collectives, so
    # ranks may run different numbers of them (unequal shares). torch >= 2.13 renamed the option.
    import inspect

    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        transformer, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def gradient_sync(module: nn.Module, enabled: bool):
    """DDP: skip the all-reduce on micro-steps inside an accumulation window (`no_sync`); the last
    micro-step's backward reduces the accumulated gradient. FSDP reduces every micro-step."""
    if not enabled and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


# ====================================================================== sharded tensors
def is_sharded(tensor: Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    """DTensor (public in torch.distributed.tensor from torch 2.5, private before), None without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def gather_to_host(tensors: dict[str, Tensor], keep: bool) -> dict[str, Tensor] | None:
    """Whole tensors on the CPU (where `keep`, i.e. on the rank that writes), gathered one at a time:
    device memory never holds more than one whole FSDP2 tensor, whatever the model's size. Every
    rank must call it (gathering is a collective)."""
    host = {} if keep else None
    for name, tensor in tensors.items():
        full = full_tensor(tensor.detach())
        if keep:
            host[name] = full.to("cpu", copy=True)
        del full
    return host


def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Loads a whole (checkpointed) tensor into a plain or FSDP2-sharded one."""
    with torch.no_grad():
        if is_sharded(target):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.copy_(full)
