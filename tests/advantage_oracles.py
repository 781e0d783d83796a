"""Oracles written from the SPEC (plain numpy loops) and input generators shared by the advantage
tests (test_advantages.py, test_advantages_cuda_engine.py)."""

import numpy as np
import torch


def numpy_gain_advantages(rewards, ids, *, normalize="joint", eps=1e-8, clip=None, step_mask=None):
    """SPEC §4, one group at a time. Gains are differences of the stored rewards (in their dtype);
    rows with a non-finite reward are left out and get 0 (the 'drop' policy)."""
    r = rewards.numpy()
    ids = ids.numpy()
    gains = (r[:, 1:] - r[:, :-1]).astype(np.float64)
    steps = np.flatnonzero(np.ones(gains.shape[1], bool) if step_mask is None else step_mask.numpy())
    finite = np.isfinite(r).all(axis=1)
    out = np.zeros(gains.shape)
    for gid in np.unique(ids):
        members = np.flatnonzero((ids == gid) & finite)
        if len(members) <= 1 or len(steps) == 0:
            continue
        block = gains[np.ix_(members, steps)]
        if normalize == "joint":
            if block.max() == block.min():
                continue
            adv = (block - block.mean()) / (block.std() + eps)
        else:
            adv = np.zeros_like(block)
            for j in range(block.shape[1]):
                col = block[:, j]
                if col.max() != col.min():
                    adv[:, j] = (col - col.mean()) / (col.std() + eps)
        if clip is not None:
            adv = np.clip(adv, -clip, clip)
        out[np.ix_(members, steps)] = adv
    return torch.from_numpy(out)


def numpy_group_advantages(rewards, ids, *, std="group", eps=1e-4, unbiased=False, clip=None):
    """Flow-GRPO's per-prompt advantages (SPEC §7), per column; non-finite rows get 0."""
    r = rewards.numpy().astype(np.float64).reshape(rewards.shape[0], -1)
    ids = ids.numpy()
    ddof = int(unbiased)
    finite = np.isfinite(r).all(axis=1)
    batch = r[finite]
    out = np.zeros_like(r)
    for gid in np.unique(ids):
        members = np.flatnonzero((ids == gid) & finite)
        if len(members) <= 1:
            continue
        for j in range(r.shape[1]):
            col = r[members, j]
            spread = batch[:, j] if std == "global" else col
            if spread.max() == spread.min():
                continue
            adv = (col - col.mean()) / (spread.std(ddof=ddof) + eps)
            out[members, j] = adv if clip is None else np.clip(adv, -clip, clip)
    return torch.from_numpy(out.reshape(rewards.shape))


def random_layout(rows, *, max_group=12, seed=0, extreme_ids=True):
    """Unsorted int64 ids, groups of 1..max_group rows, negative and huge ids."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < rows:
        sizes.append(int(rng.integers(1, max_group + 1)))
    sizes[-1] -= sum(sizes) - rows
    sizes = [s for s in sizes if s > 0]
    ids = np.unique(rng.integers(-(2**62), 2**62, size=len(sizes) * 2))[: len(sizes)]
    rng.shuffle(ids)
    if extreme_ids and len(ids) >= 3:
        ids[:3] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]
    layout = np.repeat(ids, sizes)
    rng.shuffle(layout)
    return torch.from_numpy(layout.astype(np.int64))


def rewards_for(ids, columns, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ids.numel(), columns, generator=g, dtype=torch.float64).to(dtype)


def assert_matches(got, expected, dtype):
    assert got.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got.double(), expected.double(), **tol)
