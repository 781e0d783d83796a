"""Trains the built-in backbone and its classifier reward on sklearn's digits (no download).

    python -m sfgrpo.models.train_digits --out sfgrpo/assets            # both, ~4 CPU minutes
    python -m sfgrpo.models.train_digits --what classifier --out DIR

Flow matching (SPEC §1): `x_t = (1 - t) x0 + t x1`, the transformer regresses `v = x1 - x0`.
Classes are dropped to the null class 10% of the time so classifier-free guidance works. An EMA of
the weights is what gets saved. The script ends by sampling every class with the ODE and the SDE
on the 10-step SD3 grid and reporting the classifier's accuracy on the samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from sfgrpo import reference
from sfgrpo.models.digit_classifier import CLASSIFIER_WEIGHTS, DigitClassifier
from sfgrpo.models.digits import DigitsBackbone, DigitsConfig, load_digits_data
from sfgrpo.schedules import Schedule


def train_classifier(seed: int = 0) -> tuple[DigitClassifier, dict]:
    """Logistic regression (sklearn) on [-1, 1] pixels; held-out accuracy, then refit on all."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_data()
    x, y = images.flatten(1).numpy(), labels.numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    held_out = LogisticRegression(C=0.5, max_iter=5000).fit(x_tr, y_tr).score(x_te, y_te)
    full = LogisticRegression(C=0.5, max_iter=5000).fit(x, y)
    model = DigitClassifier(x.shape[1], 10)
    with torch.no_grad():
        model.linear.weight.copy_(torch.as_tensor(full.coef_, dtype=torch.float32))
        model.linear.bias.copy_(torch.as_tensor(full.intercept_, dtype=torch.float32))
    return model.eval(), {"classifier_heldout_accuracy": float(held_out), "classifier_train_accuracy": float(full.score(x, y))}


@torch.no_grad()
def sample(model: DigitsBackbone, labels: torch.Tensor, *, sde_type: str, noise_level: float, cfg: float,
           steps: int = 10, seed: int = 0) -> torch.Tensor:
    """Class-conditional samples with the reference SDE step, for evaluation."""
    generator = torch.Generator().manual_seed(seed)
    schedule = Schedule.sd3(steps)
    x = torch.randn((labels.numel(), *model.latent_shape), generator=generator)
    cond = model.encode_prompts(labels.tolist())
    null = model.null_condition(labels.numel())
    both = tuple(torch.cat([u, c]) for u, c in zip(null, cond))
    for t, t_next in zip(schedule.t.tolist(), schedule.t_next.tolist()):
        t_row = torch.full((labels.numel(),), t)
        v_uncond, v_cond = model.velocity(torch.cat([x, x]), torch.cat([t_row, t_row]), both).chunk(2)
        v = v_uncond + cfg * (v_cond - v_uncond)
        x = reference.sde_step(x, v, t, t_next, noise_level, sde_type=sde_type, generator=generator,
                               sigma_max=schedule.sigma_max).prev_sample
    return model.decode(x)


def evaluate(model: DigitsBackbone, classifier: DigitClassifier, per_class: int = 50) -> dict:
    labels = torch.arange(10).repeat_interleave(per_class)
    result = {}
    for name, sde_type, level in (("ode", "ode", 0.0), ("sde", "sde", 0.7)):
        for cfg in (1.0, 2.0):
            images = sample(model, labels, sde_type=sde_type, noise_level=level, cfg=cfg)
            accuracy = (classifier(images).argmax(-1) == labels).float().mean().item()
            result[f"{name}_cfg{cfg:g}_accuracy"] = accuracy
    return result


def train_backbone(steps: int, batch_size: int, lr: float, ema_decay: float, seed: int, log_every: int = 100):
    torch.manual_seed(seed)
    images, labels = load_digits_data()
    model = DigitsBackbone(DigitsConfig())
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) + 0.05
    )
    null = model.conditioner.null_class
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,))
        x0, y = images[index], labels[index]
        y = torch.where(torch.rand(batch_size) < 0.1, torch.full_like(y, null), y)
        x1 = torch.randn_like(x0)
        # logit-normal times (SD3's choice) mixed with uniform so both ends of the grid are seen
        t = torch.where(torch.rand(batch_size) < 0.5, torch.sigmoid(torch.randn(batch_size)), torch.rand(batch_size))
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
        v = model.velocity(x_t, t, model.conditioner(y))
        loss = (v - (x1 - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - ema_decay)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    return ema.eval(), {"train_seconds": time.time() - start, "final_loss": float(loss.item())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sfgrpo/assets", help="directory for the safetensors + json files")
    parser.add_argument("--what", choices=("all", "backbone", "classifier"), default="all")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if args.what in ("all", "classifier"):
        classifier, stats = train_classifier(args.seed)
        classifier.save(out / CLASSIFIER_WEIGHTS)
        report.update(stats)
        print(json.dumps(stats), flush=True)
    else:
        classifier = DigitClassifier.load(out / CLASSIFIER_WEIGHTS)
    if args.what in ("all", "backbone"):
        model, stats = train_backbone(args.steps, args.batch_size, args.lr, args.ema_decay, args.seed)
        model.save(out)
        report.update(stats)
        report.update(evaluate(model, classifier))
        report.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                      parameters=sum(p.numel() for p in model.parameters()))
        (out / "digits_backbone_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
