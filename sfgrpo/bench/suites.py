"""Named benchmark suites: lists of cases, each a trainer configuration and the phase it is about.

Every case runs whole training iterations (so each phase sees the state a real run gives it) and
reports all phases; `kind` names the phase the case is about, whose time gives its images/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("rollout", "lookahead", "update", "iteration")
IMPLEMENTATIONS = ("sfgrpo", "reference", "flow_grpo-code", "sfgrpo+compile")


@dataclass
class Case:
    name: str
    kind: str  # which phase the case measures: rollout | lookahead | update | iteration
    backbone: str = "digits"  # "digits" (built-in) or a name in bench.configs.TRANSFORMERS
    overrides: dict = field(default_factory=dict)  # TrainerConfig fields
    resolution: int = 128  # transformer-config backbones only
    text_tokens: int | None = None  # transformer-config backbones: None = the real pipeline's count
    dtype: str = "float32"
    # groups per iteration to sweep; on CUDA the sweep stops at the first out-of-memory
    prompts_sweep: tuple[int, ...] = (2,)
    implementations: tuple[str, ...] = ("sfgrpo", "reference")


@dataclass
class Suite:
    name: str
    cases: list[Case]
    warmup: int = 1
    iterations: int = 3
    device: str = "cpu"
    # run order within a backbone (runner.plan): "case" (each case with all its implementations) or
    # "implementation" (the first implementation on every case, then the next: most important first)
    order: str = "case"


def _digits_cases(group: int, prompts: int, compile_iteration: bool) -> list[Case]:
    sweep = (prompts,)
    base = dict(group_size=group, reward="digit*darkness")
    both = ("sfgrpo", "reference")
    loop = both + ("flow_grpo-code",)  # whole iterations also against Flow-GRPO's own formulation
    return [
        Case("rollout cfg=off", "rollout", overrides=dict(base, guidance_scale=1.0), prompts_sweep=sweep),
        Case("rollout cfg=on", "rollout", overrides=dict(base, guidance_scale=2.0), prompts_sweep=sweep),
        Case("lookahead T'=1", "lookahead", overrides=dict(base, lookahead_steps=1), prompts_sweep=sweep),
        Case("lookahead T'=5", "lookahead", overrides=dict(base, lookahead_steps=5), prompts_sweep=sweep),
        Case("update full", "update", overrides=dict(base), prompts_sweep=sweep),
        Case("update full+KL", "update", overrides=dict(base, beta=0.04), prompts_sweep=sweep),
        Case("update lora", "update", overrides=dict(base, use_lora=True, lora_rank=8, lora_alpha=16),
             prompts_sweep=sweep),
        Case("update lora+KL", "update", overrides=dict(base, use_lora=True, lora_rank=8, lora_alpha=16, beta=0.04),
             prompts_sweep=sweep),
        Case("iteration flow_grpo", "iteration", overrides=dict(base, mode="flow_grpo"), prompts_sweep=sweep,
             implementations=loop),
        Case("iteration stepwise T'=1", "iteration", overrides=dict(base, mode="stepwise", lookahead_steps=1),
             prompts_sweep=sweep, implementations=loop + (("sfgrpo+compile",) if compile_iteration else ())),
        Case("iteration stepwise T'=5", "iteration", overrides=dict(base, mode="stepwise", lookahead_steps=5),
             prompts_sweep=sweep),
        # CFG in the update: sfgrpo reuses the rollout's unconditional velocity; Flow-GRPO's code
        # (flow_grpo-code) runs both halves with autograd
        Case("iteration stepwise T'=1 cfg=on", "iteration",
             overrides=dict(base, mode="stepwise", lookahead_steps=1, guidance_scale=2.0), prompts_sweep=sweep,
             implementations=loop),
    ]


def _small_transformer_cases(group: int) -> list[Case]:
    lora = dict(group_size=group, reward="brightness", guidance_scale=4.5, use_lora=True, lora_rank=8,
                lora_alpha=16, beta=0.04, prompts="a cat,a dog,a red car,a tree")
    # with CFG, flow_grpo-code also runs Flow-GRPO's update forward (both halves with autograd)
    loop = ("sfgrpo", "reference", "flow_grpo-code")
    return [
        Case(f"iteration {name} stepwise T'=1", "iteration", backbone=name, overrides=dict(lora, mode="stepwise"),
             resolution=128, text_tokens=16, prompts_sweep=(1,), implementations=loop)
        for name in ("sd35m-small", "flux1-dev-small")
    ] + [
        Case("iteration sd35m-small flow_grpo", "iteration", backbone="sd35m-small",
             overrides=dict(lora, mode="flow_grpo"), resolution=128, text_tokens=16, prompts_sweep=(1,),
             implementations=loop),
    ]


def _real_size_cases() -> list[Case]:
    """SD3.5-Medium and FLUX.1-dev transformers at 512 px, bf16 storage and autocast, the paper's
    setting (T = 10, group 24, CFG 4.5, LoRA r32, beta 0.04, T' = 1 and 5). The update trains
    minibatches of 8 trajectories (Flow-GRPO's per-GPU size is of that order): a whole group of 24
    in one SD3.5-M forward with autograd holds ~2 GB of activations per trajectory at 512 px, ~50 GB."""
    common = dict(group_size=24, reward="brightness", guidance_scale=4.5, mixed_precision="bf16",
                  prompts="a photo of a cat,a red car,a bowl of fruit,a city at night", lookahead_batch_size=48,
                  train_batch_size=8)
    lora = dict(common, use_lora=True, lora_rank=32, lora_alpha=64.0, beta=0.04)
    sweep = (1, 2, 4, 8)  # x24 trajectories per iteration, until out of memory
    all_impls = IMPLEMENTATIONS
    cases = []
    for name in ("sd35m", "flux1-dev"):
        real = dict(backbone=name, resolution=512, dtype="bfloat16")
        flux_guidance = dict(guidance_scale=1.0) if name == "flux1-dev" else {}  # FLUX-dev: embedded guidance only
        cases += [
            Case(f"{name} rollout cfg=off", "rollout", overrides=dict(lora, guidance_scale=1.0), prompts_sweep=(1,),
                 **real),
            Case(f"{name} rollout cfg=on", "rollout", overrides=dict(lora), prompts_sweep=(1,), **real),
            Case(f"{name} lookahead T'=1", "lookahead", overrides=dict(lora, **flux_guidance, lookahead_steps=1),
                 prompts_sweep=(1,), **real),
            Case(f"{name} lookahead T'=5", "lookahead", overrides=dict(lora, **flux_guidance, lookahead_steps=5),
                 prompts_sweep=(1,), **real),
            Case(f"{name} update lora", "update", overrides=dict(lora, **flux_guidance, beta=0.0),
                 prompts_sweep=(1,), **real),
            Case(f"{name} update lora+KL", "update", overrides=dict(lora, **flux_guidance), prompts_sweep=(1,), **real),
            Case(f"{name} update full", "update", overrides=dict(common, **flux_guidance), prompts_sweep=(1,), **real),
            Case(f"{name} update full+KL", "update", overrides=dict(common, **flux_guidance, beta=0.04),
                 prompts_sweep=(1,), **real),
            Case(f"{name} iteration flow_grpo", "iteration", overrides=dict(lora, **flux_guidance, mode="flow_grpo"),
                 prompts_sweep=sweep, implementations=all_impls, **real),
            Case(f"{name} iteration stepwise T'=1", "iteration",
                 overrides=dict(lora, **flux_guidance, mode="stepwise", lookahead_steps=1),
                 prompts_sweep=sweep, implementations=all_impls, **real),
            Case(f"{name} iteration stepwise T'=5", "iteration",
                 overrides=dict(lora, **flux_guidance, mode="stepwise", lookahead_steps=5),
                 prompts_sweep=(1,), **real),
        ]
    return cases


def get_suite(name: str) -> Suite:
    if name == "quick":  # the CPU smoke run (tests, `--quick`): seconds
        cases = [
            Case("rollout cfg=on", "rollout", overrides=dict(group_size=4, guidance_scale=2.0), prompts_sweep=(2,)),
            Case("iteration flow_grpo", "iteration", overrides=dict(group_size=4, mode="flow_grpo", beta=0.04),
                 prompts_sweep=(2,), implementations=("sfgrpo", "reference", "flow_grpo-code")),
            Case("iteration stepwise T'=1", "iteration", overrides=dict(group_size=4, mode="stepwise"),
                 prompts_sweep=(2,), implementations=("sfgrpo", "reference", "flow_grpo-code")),
            Case("iteration sd35m-small stepwise T'=1", "iteration", backbone="sd35m-small",
                 overrides=dict(group_size=2, reward="brightness", prompts="a,b"), resolution=64, text_tokens=8,
                 prompts_sweep=(1,)),
        ]
        return Suite("quick", cases, warmup=1, iterations=2)
    if name == "cpu":  # small configs, a few minutes on a laptop CPU
        return Suite("cpu", _digits_cases(group=16, prompts=2, compile_iteration=True) + _small_transformer_cases(4),
                     warmup=1, iterations=3)
    if name == "gpu":  # real-size backbones; the one command for a GPU (an hour or more)
        cases = _digits_cases(group=24, prompts=4, compile_iteration=True) + _real_size_cases()
        return Suite("gpu", cases, warmup=2, iterations=5, device="cuda")
    if name == "gpu-core":  # the three goals on SD3.5-M in a few minutes of GPU time
        core = {"sd35m iteration flow_grpo", "sd35m iteration stepwise T'=1"}
        # group 16 (the low end of the 16-24) and one measured iteration: an SD3.5-M iteration
        # at 512 px is ~1,500 image forwards (~3.8 PFLOP at group 24), so each run (warm-up, measured
        # and sync-count iterations) takes tens of seconds on an H100, and a GPU session has minutes
        cases = [Case(c.name, c.kind, backbone=c.backbone, overrides=dict(c.overrides, group_size=16),
                      resolution=c.resolution, text_tokens=c.text_tokens, dtype=c.dtype, prompts_sweep=(1,),
                      implementations=("sfgrpo", "reference", "flow_grpo-code"))
                 for c in _real_size_cases() if c.name in core]
        # sfgrpo on both cases, then the reference ops, then Flow-GRPO's code: the goals' rows come
        # first when `--time-budget` cuts the run short
        return Suite("gpu-core", cases, warmup=1, iterations=1, device="cuda", order="implementation")
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")


SUITES = ("quick", "cpu", "gpu", "gpu-core")
