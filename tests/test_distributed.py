"""Data-parallel training (DDP / FSDP2 over gloo, 2 CPU processes) equals one process on the same
global batch; noise is stateless; only rank 0 writes; resume after a stop is exact."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from sfgrpo import distributed
from sfgrpo.models.pipelines import backbone_families
from sfgrpo.trainer import Trainer, TrainerConfig
from sfgrpo.trainer.rollout import rollout

torch.set_num_threads(1)

WORLD = 2
# 3 groups of 3 = 9 trajectories: rank 0 holds rows 0-4, rank 1 rows 5-8 (unequal shares, group 1
# spans both ranks)
BASE = dict(backbone="tiny-random", reward="brightness", prompts_per_iteration=3, group_size=3, num_steps=4,
            progress=False, plots=False, learning_rate=3e-3, clip_range=0.2, gradient_accumulation_steps=2,
            threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, values, out_dir, separate_rank_dirs):
    """One rank: train, keep every iteration's advantages (this rank's rows) and the final weights."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        values = dict(values)
        if separate_rank_dirs and rank > 0:  # so the test can see whether rank 1 wrote anything
            values["output_dir"] = os.path.join(out_dir, f"rank{rank}-outputs")
        trainer = Trainer(TrainerConfig(**values))
        advantages, compute = [], trainer.advantages
        trainer.advantages = lambda rewards, ids: advantages.append(compute(rewards, ids)) or advantages[-1]
        history = trainer.train()
        weights = {n: distributed.full_tensor(p.detach()).clone() for n, p in trainer.trainable.items()}
        checkpointing = getattr(distributed.unwrap(trainer.model.transformer), "gradient_checkpointing", None)
        torch.save({"history": history, "weights": weights, "advantages": advantages, "checkpointing": checkpointing,
                    "evaluations": trainer.eval_history}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, separate_rank_dirs=False, world=WORLD, **overrides) -> list[dict]:
    values = {**BASE, "output_dir": str(tmp_path / "run"), **overrides}
    tmp_path.mkdir(parents=True, exist_ok=True)
    # fork: the children start with torch and sfgrpo already imported (spawn would re-import them)
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, _free_port(), values, str(tmp_path), separate_rank_dirs), nprocs=world,
        start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_one_process(tmp_path, **overrides):
    trainer = Trainer(TrainerConfig(**{**BASE, "output_dir": str(tmp_path / "run"), **overrides}))
    advantages, compute = [], trainer.advantages
    trainer.advantages = lambda rewards, ids: advantages.append(compute(rewards, ids)) or advantages[-1]
    history = trainer.train()
    return trainer, history, advantages


# Tolerances. The first iteration's rollout and advantages are bitwise those of one process (same
# weights, same noise). Its update is not bitwise: a rank backpropagates its own rows and the
# all-reduce adds the halves, so float sums are ordered differently (~1e-8 on the weights after one
# iteration); later rollouts inherit that. Measured after 4 iterations (lr 3e-3, 8 AdamW steps):
# weights <= 1.2e-6 absolute (weights up to ~0.9), advantages (O(1)) <= 9e-6, logged means ~1e-7.
WEIGHTS = dict(rtol=1e-6, atol=2e-6)
ADVANTAGES = dict(rtol=1e-5, atol=2e-5)
RECORDS = dict(rtol=1e-5, atol=1e-6)


def assert_advantages_match(ranks: list[dict], expected: list, exact_first: bool = True, **tolerance) -> None:
    for iteration, one_process in enumerate(expected):
        got = torch.cat([r["advantages"][iteration] for r in ranks])  # rank order = global row order
        assert got.shape == one_process.shape
        if iteration == 0 and exact_first:
            assert torch.equal(got, one_process)
        torch.testing.assert_close(got, one_process, **(tolerance or ADVANTAGES))


DETERMINISTIC = lambda record: {k: v for k, v in record.items() if not k.startswith("time/")}  # noqa: E731


def assert_records_close(got: list[dict], expected: list[dict], rtol: float, atol: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        a, b = DETERMINISTIC(a), DETERMINISTIC(b)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(torch.tensor(a[key], dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64),
                                       rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------- no processes needed
def test_shards_cover_the_batch_once_with_near_equal_shares():
    for total in (1, 7, 9, 64):
        for world in (1, 2, 3, 8):
            if total < world:
                continue
            shards = [distributed.shard_rows(total, r, world) for r in range(world)]
            assert [j for s in shards for j in s] == list(range(total))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # the rank weights average to 1 under DDP's mean: the gradient of the global batch's mean
    assert sum(distributed.loss_scale(n, 9, 2) for n in (5, 4)) / 2 == pytest.approx(1.0)
    assert distributed.loss_scale(3, 6, 2) == 1.0


def test_stateless_noise_split_over_shards_equals_one_rollout(tmp_path):
    """The union of the shards' rollouts is the one-process rollout: the same shared initial noise
    wherever a group's members live, the same step noise for every global trajectory."""
    trainer = Trainer(TrainerConfig(**{**BASE, "output_dir": str(tmp_path)}))
    prompts = trainer.prompts_for(0)
    noise = distributed.TrajectoryNoise(seed=5, iteration=3, device=torch.device("cpu"))
    args = dict(sde_type="sde", logprob="gaussian", noise=noise)
    whole = rollout(trainer.guided, prompts, 3, trainer.steps, **args)
    parts = [rollout(trainer.guided, prompts, 3, trainer.steps, rows=distributed.shard_rows(9, r, 2), **args)
             for r in range(2)]
    for name in ("states", "samples"):
        joined = torch.cat([getattr(p, name) for p in parts], dim=1)
        torch.testing.assert_close(joined, getattr(whole, name), rtol=1e-6, atol=1e-6)
    assert torch.cat([p.group_ids for p in parts]).tolist() == whole.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    start = whole.states[0]
    assert torch.equal(parts[0].states[0][3], parts[1].states[0][0])  # group 1 spans ranks: same start
    assert not torch.equal(start[0], start[3]) and not torch.equal(whole.samples[0][0], whole.samples[0][1])
    other = distributed.TrajectoryNoise(seed=5, iteration=4, device=torch.device("cpu"))
    assert not torch.equal(other.initial([0], (4,)), noise.initial([0], (4,)))


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="starting from scratch"):
        trainer = Trainer(TrainerConfig(**{**BASE, "output_dir": str(tmp_path / "run"), "resume_from": "latest"}))
    assert trainer.iteration == 0


# ---------------------------------------------------------------------- 2 gloo processes
@pytest.fixture(scope="module")
def ddp_four_iterations(tmp_path_factory):
    """The uninterrupted 2-process DDP run (4 iterations, checkpoints every 2), and its 1-process twin."""
    root = tmp_path_factory.mktemp("ddp")
    overrides = dict(iterations=4, checkpoint_every=2, image_every=2, plots=True)
    ranks = run_ranks(root / "two", separate_rank_dirs=True, **overrides)
    single = run_one_process(root / "one", **overrides)
    return root, ranks, single


def test_ddp_matches_one_process_on_the_same_global_batch(ddp_four_iterations):
    root, ranks, (trainer, history, advantages) = ddp_four_iterations
    assert advantages[0].shape == (9, 4)
    assert_advantages_match(ranks, advantages)
    # the same updated weights after 4 iterations of 2 optimizer steps, on both ranks
    for r in ranks:
        for name, value in trainer.trainable.items():
            torch.testing.assert_close(r["weights"][name], value.detach(), **WEIGHTS)
    # every rank logs the same record, and it is the 1-process record
    assert_records_close(ranks[1]["history"], ranks[0]["history"], rtol=0, atol=0)
    assert_records_close(ranks[0]["history"], history, **RECORDS)


def test_only_rank_zero_writes(ddp_four_iterations):
    root = ddp_four_iterations[0]
    run = root / "two" / "run"
    assert not (root / "two" / "rank1-outputs").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter-000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-000002", "iter-000004", "latest"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "images" / "samples-iter000004.png").exists() and (run / "config.json").exists()


def test_resume_after_a_stop_reproduces_the_uninterrupted_run(ddp_four_iterations, tmp_path):
    root, uninterrupted, _ = ddp_four_iterations
    # the "killed" run: its last checkpoint is iteration 2; then a restart with --resume-from latest
    shutil.copytree(root / "two" / "run" / "checkpoints" / "iter-000002", tmp_path / "run" / "checkpoints" / "iter-000002")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter-000002\n")
    resumed = run_ranks(tmp_path, iterations=4, checkpoint_every=2, image_every=2, resume_from="latest")
    assert_records_close(resumed[0]["history"], uninterrupted[0]["history"], rtol=0, atol=0)
    for name, value in uninterrupted[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name
    # stateless noise: a single process resumes the 2-process checkpoint just as well
    trainer, history, _ = run_one_process(tmp_path / "one", iterations=4, resume_from=str(
        root / "two" / "run" / "checkpoints" / "iter-000002"))
    assert_records_close(history, uninterrupted[0]["history"], **RECORDS)


def test_ddp_lora_with_reference_kl_matches_one_process(tmp_path):
    pytest.importorskip("peft")
    overrides = dict(iterations=2, mode="flow_grpo", use_lora=True, lora_rank=4, lora_alpha=8.0, beta=0.1,
                     prompts_per_iteration=2, group_size=4)  # equal shares of 4 rows
    ranks = run_ranks(tmp_path / "two", **overrides)
    trainer, history, advantages = run_one_process(tmp_path / "one", **overrides)
    assert history[-1]["kl"] > 0
    assert_advantages_match(ranks, advantages)
    for name, value in trainer.trainable.items():
        assert "lora_" in name
        torch.testing.assert_close(ranks[0]["weights"][name], value.detach(), **WEIGHTS)
    assert_records_close(ranks[0]["history"], history, **RECORDS)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("family", [backbone.family for backbone in backbone_families().values()])
def test_diffusers_checkpoints_in_data_parallel_match_one_process(tmp_path, family, strategy):
    """The multi-GPU settings on real pipelines, LoRA under DDP and a full fine-tune under FSDP2
    (sharded blocks, activation checkpointing): the backbone must still read its transformer's
    config (latent shape, guidance embedding) once DDP wraps the transformer."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from sfgrpo.models import tiny

    path = tiny.save_tiny(family, tmp_path / "checkpoint")
    overrides = dict(backbone=str(path), prompts="a cat,two dogs", resolution=16, max_sequence_length=8,
                     iterations=2, use_lora=strategy == "ddp", lora_rank=2, lora_alpha=4.0, beta=0.04,
                     prompts_per_iteration=2, group_size=2, num_steps=3, distributed=strategy,
                     guidance_scale=1.0 if family == "flux" else 3.0,
                     # AdamW's first step moves a weight by ~lr whatever the size of its gradient, so a
                     # near-zero gradient summed in another order could flip it; a large eps makes the
                     # step proportional to the gradient, so the comparison measures the gradients
                     adam_eps=1e-2)
    ranks = run_ranks(tmp_path / "two", **overrides)
    trainer, history, advantages = run_one_process(tmp_path / "one", **overrides)
    # A rank encodes and rolls out half the batch. For SD3 and FLUX.1 that gives one process's bits
    # on this CPU; Qwen-Image pads each batch's prompts to its longest (a rank's rows are padded
    # less), and FLUX.2's Qwen3 encoder and transformer round differently with the batch size:
    # the same math, float sums in another order
    # (the second iteration's advantages normalise rewards that differ little within a group: the
    # weights' float differences after one update show up amplified, ~3e-5)
    assert_advantages_match(ranks, advantages, exact_first=family in ("sd3", "flux", "chroma"), rtol=1e-4, atol=1e-4)
    assert ranks[0]["history"][-1]["ratio_mean"] == 1.0
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], value.detach(), **WEIGHTS)


def test_fsdp2_full_finetune_matches_one_process(tmp_path):
    # evaluations too: 3 eval prompts, one per network call, over 2 ranks: rank 1 runs a padding call
    # so that both make the same (collective) forwards
    overrides = dict(iterations=2, distributed="fsdp", prompts_per_iteration=2, group_size=4, beta=0.05,
                     ema_decay=0.5, eval_every=1, eval_num_steps=3, eval_prompts="1,2,3", eval_batch_size=1)
    ranks = run_ranks(tmp_path / "two", **overrides)
    assert ranks[0]["checkpointing"] is True  # activation checkpointing is on by default with FSDP
    trainer, history, advantages = run_one_process(tmp_path / "one", **overrides)  # 1 process: no wrapping
    assert_advantages_match(ranks, advantages)
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], value.detach(), **WEIGHTS)
    assert_records_close(ranks[0]["history"], history, **RECORDS)
    assert_records_close(ranks[1]["evaluations"], ranks[0]["evaluations"], rtol=0, atol=0)
    assert_records_close(ranks[0]["evaluations"], trainer.eval_history, **RECORDS)
    assert [r["iteration"] for r in trainer.eval_history] == [0, 1, 2]
    # the checkpoint holds whole tensors: a single process loads it
    resumed = Trainer(TrainerConfig(**{**BASE, **overrides, "output_dir": str(tmp_path / "two" / "run"),
                                       "resume_from": "latest"}))
    assert resumed.iteration == 2
    for name, value in resumed.trainable.items():
        torch.testing.assert_close(value.detach(), ranks[0]["weights"][name], rtol=0, atol=0)


def test_fsdp2_bf16_mixed_precision_keeps_fp32_shards(tmp_path):
    # FSDP's parameter dtype bf16: all-gathers and compute in bf16, fp32 shards and reductions; one
    # process autocasts instead, so the two agree to bf16's precision, not bit for bit
    overrides = dict(iterations=2, distributed="fsdp", prompts_per_iteration=2, group_size=4, mixed_precision="bf16")
    ranks = run_ranks(tmp_path / "two", **overrides)
    trainer, history, _ = run_one_process(tmp_path / "one", **overrides)
    assert {v.dtype for v in ranks[0]["weights"].values()} == {torch.float32}
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], value.detach(), rtol=0.05, atol=0.05)
    assert_records_close(ranks[0]["history"], history, rtol=0.05, atol=0.05)


def test_fsdp2_sharded_checkpoints_resume_exactly_on_any_number_of_processes(tmp_path):
    # every rank writes its own shards; a restart on 2 processes continues bit for bit, and one
    # process (torch.distributed.checkpoint reshards) continues like the 1-process twin
    overrides = dict(iterations=4, checkpoint_every=2, distributed="fsdp", checkpoint_format="sharded",
                     prompts_per_iteration=2, group_size=4, ema_decay=0.5)
    uninterrupted = run_ranks(tmp_path / "two", **overrides)
    written = tmp_path / "two" / "run" / "checkpoints" / "iter-000002"
    assert sorted(p.name for p in written.iterdir()) == ["sharded", "state.pt"]
    assert sorted(p.name for p in (written / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(written, tmp_path / "restart" / "run" / "checkpoints" / "iter-000002")
    (tmp_path / "restart" / "run" / "checkpoints" / "latest").write_text("iter-000002\n")
    resumed = run_ranks(tmp_path / "restart", **overrides, resume_from="latest")
    assert_records_close(resumed[0]["history"], uninterrupted[0]["history"], rtol=0, atol=0)
    for name, value in uninterrupted[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name
    trainer, history, _ = run_one_process(tmp_path / "one", **overrides, resume_from=str(written))
    assert trainer.iteration == 4
    assert_records_close(history, uninterrupted[0]["history"], **RECORDS)
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(value.detach(), uninterrupted[0]["weights"][name], **WEIGHTS)


CRASHING_REWARD = """
import os, pathlib
from sfgrpo.rewards.builtin import contrast

calls = 0


def contrast_but_rank1_dies_once(images, prompts):
    # the whole process of rank 1 vanishes during iteration 3, once (the marker survives restarts)
    global calls
    calls += 1
    marker = pathlib.Path(os.environ["CRASH_MARKER"])
    if os.environ["RANK"] == "1" and calls == 3 and not marker.exists():
        marker.write_text("rank 1 died here")
        os._exit(17)
    return contrast(images, prompts)
"""


def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    """`torchrun --nproc_per_node 2 --max-restarts 1 -m sfgrpo.cli train ... --resume-from latest`:
    the first launch starts fresh (no checkpoint yet); rank 1 dies in iteration 3; torchrun
    restarts both ranks, which resume from the iteration-2 checkpoint and finish. The result is
    the uninterrupted run's (computed here by one process)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is not installed next to this interpreter"
    (tmp_path / "crashing_reward.py").write_text(CRASHING_REWARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_MARKER": str(tmp_path / "crashed"),
           "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flags = dict(backbone="tiny-random", iterations=4, prompts_per_iteration=2, group_size=2, num_steps=3,
                 checkpoint_every=1, threads=1)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    result = subprocess.run(
        # the dynamic (c10d) rendezvous of elastic multi-node jobs (the static one works as well)
        [torchrun, "--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "sfgrpo.cli", "train", *args,
         "--reward", "crashing_reward:contrast_but_rank1_dies_once", "--no-progress", "--no-plots",
         "--output-dir", str(tmp_path / "out"), "--resume-from", "latest"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-12000:]  # every rank's own error, not only torchrun's
    assert (tmp_path / "crashed").exists(), "rank 1 never died: the restart was not exercised"
    assert "(2 processes)" in result.stdout and result.stdout.count("outputs in") == 1  # rank 0 prints
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "iter-000004"
    uninterrupted = Trainer(TrainerConfig(**flags, reward="contrast", output_dir=str(tmp_path / "one"),
                                          progress=False, plots=False)).train()
    assert_records_close(lines, uninterrupted, **RECORDS)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cfg_update_runs_its_unconditional_forward_without_autograd_on_wrapped_models(tmp_path, strategy):
    """The update's constant unconditional branch (`cfg_gradient="cond"`) is a forward without
    autograd between DDP's / FSDP2's hooks (FSDP2: all-gathers, activation checkpointing on).
    Guided rollouts are not bitwise batch-size invariant on this CPU (the ranks' forwards hold half
    the rows) and AdamW amplifies that where a gradient is ~0, so the ranks' update is compared with
    one process's as a whole: they differ by under 0.1 % of its size."""
    overrides = dict(iterations=1, distributed=strategy, prompts_per_iteration=2, group_size=4, guidance_scale=2.0)
    initial = {n: p.detach().clone() for n, p in
               Trainer(TrainerConfig(**{**BASE, **overrides, "output_dir": str(tmp_path / "init")})).trainable.items()}
    ranks = run_ranks(tmp_path / "two", **overrides)
    trainer, history, _ = run_one_process(tmp_path / "one", **overrides)
    assert trainer.config.cfg_gradient == "cond"
    moved = difference = 0.0
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        moved += (value.detach() - initial[name]).square().sum().item()
        difference += (ranks[0]["weights"][name] - value.detach()).square().sum().item()
    assert moved > 0 and difference < 1e-6 * moved  # norms: under 0.1 % (measured 7e-5)
    assert_records_close(ranks[0]["history"], history, rtol=1e-3, atol=1e-5)


def test_fsdp2_lookahead_makes_the_same_calls_on_every_process(tmp_path):
    """3 groups of 4 over 4 processes: shares of 3 rows hold 1, 2, 2 and 1 groups, so the once-per-
    group initial estimates would give the processes different numbers of chunked look-ahead
    forwards (FSDP all-gathers: a collective mismatch); they are padded to the same number."""
    ranks = run_ranks(tmp_path, world=4, iterations=1, distributed="fsdp", prompts_per_iteration=3, group_size=4,
                      lookahead_steps=2, lookahead_batch_size=1)
    assert len(ranks) == 4 and all(math.isfinite(r["history"][-1]["reward_mean"]) for r in ranks)


def test_fsdp2_bf16_keeps_the_timestep_in_fp32(tmp_path):
    """FSDP2's mixed precision must not cast the forward's inputs: the root unit would round SD3's
    `timestep = 1000 t` to bf16 (987.31 -> 988), which one GPU and DDP never do."""
    import torch.distributed as dist

    from sfgrpo.bench.backbones import build_backbone

    # a file store: no port to race for
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_backbone("sd35m-small", resolution=64)
        distributed.shard_fsdp(model.transformer, torch.device("cpu"), torch.bfloat16)
        seen = []
        model.transformer.time_text_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        t = torch.tensor([0.98731, 0.7003])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.velocity(torch.randn(2, *model.latent_shape), t, model.encode_prompts(["a", "b"]))
        assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t * 1000.0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_qwen_image_trains_under_ddp_with_its_unused_text_output_frozen(tmp_path, lora):
    """Qwen-Image returns only the image stream, so its last block's text output (to_add_out, the
    text MLP) never gets a gradient: a full fine-tune, or LoRA on the default targets (both
    streams), would leave DDP waiting for those gradients on the second backward. They stay frozen."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from sfgrpo.models import tiny

    path = tiny.save_tiny_qwen_image(tmp_path / "checkpoint")
    overrides = dict(backbone=str(path), prompts="a cat,two dogs", resolution=16, max_sequence_length=8,
                     iterations=2, use_lora=lora, lora_rank=2, lora_alpha=4.0, prompts_per_iteration=2,
                     group_size=2, num_steps=3, guidance_scale=3.0, adam_eps=1e-2)
    ranks = run_ranks(tmp_path / "two", **overrides)
    trainer, history, _ = run_one_process(tmp_path / "one", **overrides)
    assert not any("to_add_out" in n or "txt_mlp" in n for n in trainer.trainable if "blocks.0." in n)
    assert any("add_q_proj" in n for n in trainer.trainable)  # the text stream trains where it is read
    for name, value in trainer.trainable.items():
        torch.testing.assert_close(ranks[0]["weights"][name], value.detach(), **WEIGHTS)
