"""What this installation can do: versions, native build, Triton, GPU, backend per op."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

import torch

from sfgrpo import _native, backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load_ops() -> None:
    """Imports the op modules so that every op is registered with the backend table."""
    try:
        importlib.import_module("sfgrpo.ops")
    except ModuleNotFoundError as err:
        if err.name != "sfgrpo.ops":
            raise


def collect() -> dict:
    _load_ops()
    from sfgrpo import __version__

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "versions": {
            "sfgrpo": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda or "none (CPU build)",
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "numpy": _version("numpy"),
        },
        # what optional features need (README): peft for LoRA, transformers for real backbones and
        # learned rewards, Pillow for HTTP rewards and image grids, matplotlib for plots, the trackers
        "optional": {dist: _version(dist) for dist in ("peft", "transformers", "pillow", "matplotlib",
                                                          "tensorboard", "wandb", "xformers")},
        "native": _native.build_info(),
        "pipelines": _pipeline_support(),
        "gpu": gpu,
        "backend_requested": backend.requested_backend(),
        "triton_interpreter": backend.triton_interpreter_enabled(),
        "available": {d: backend.available_backends(d) for d in devices},
        "ops": {
            op: {d: backend.resolve_backend(op, d) for d in devices}
            for op in sorted(backend.registered_ops())
        },
        "switches": _switches(),
        "fused_blocks": _fused_block_support(),
        "fused_lora": _fused_lora_support(),
    }


def _fused_block_support() -> dict[str, str]:
    try:
        from sfgrpo.models import fused_attention, fused_blocks

        return {**fused_blocks.support(), **fused_attention.support()}
    except ImportError as err:  # no diffusers: nothing to fuse
        return {"(all)": f"unavailable: {err}"}


def _fused_lora_support() -> str:
    """What --fused-lora does with the installed peft."""
    try:
        from peft.tuners.lora import Linear  # noqa: F401
    except ImportError:
        return "unavailable: peft is not installed (LoRA needs it)"
    return (f"peft {_version('peft')}: lora.Linear layers run sfgrpo.lora_linear (peft's forward for DoRA, dropout, "
            "merged or disabled adapters)")


def _switches() -> dict[str, str]:
    """The environment switches of the accelerated paths, as this process sees them."""
    switches = {
        "SFGRPO_TRITON_DIRECT_LAUNCH": backend.environ_get("SFGRPO_TRITON_DIRECT_LAUNCH") or "(unset: on)",
        "SFGRPO_ADVANTAGES_COOPERATIVE": backend.environ_get("SFGRPO_ADVANTAGES_COOPERATIVE") or "(unset: on)",
        "SFGRPO_ADVANTAGES_STAGE_ROWS": backend.environ_get("SFGRPO_ADVANTAGES_STAGE_ROWS") or "(unset: on)",
    }
    try:
        from sfgrpo.kernels import sde_step as kernels
    except ImportError:  # no Triton: the SDE step has no kernels to tune
        switches["SFGRPO_SDE_STEP_TUNING"] = "(Triton not installed)"
    else:
        source = "" if backend.environ_get(kernels.TUNING_ENV) else " (defaults)"
        switches["SFGRPO_SDE_STEP_TUNING"] = f"{kernels.TUNING}{source}"
    return switches


def _pipeline_support() -> dict[str, bool]:
    """The diffusers checkpoint families sfgrpo wraps, and whether the installed diffusers has each."""
    from sfgrpo.models.pipelines import backbone_families

    try:
        import diffusers
    except ImportError:
        return {name: False for name in backbone_families()}
    available = set(dir(diffusers))  # the lazy module lists its names without importing the pipelines
    return {name: name in available for name in backbone_families()}


def format_report(info: dict) -> str:
    lines = ["sfgrpo installation report", ""]
    lines += [f"  {name:<10} {value}" for name, value in info["versions"].items()]
    lines += ["", "optional packages:"]
    lines += [f"  {name:<12} {value}" for name, value in info["optional"].items()]
    native = info["native"]
    lines += ["", "native module sfgrpo._C:"]
    if native.get("cpu"):
        lines.append(f"  CPU code   yes ({native.get('cxx_compiler', '')})")
        if native.get("cuda"):
            lines.append(f"  CUDA code  yes, archs {native['cuda_archs']} (nvcc {native['cuda_compiler']})")
        else:
            lines.append("  CUDA code  no (nvcc was not found at build time)")
    else:
        lines.append(f"  not available: {native.get('error')}")
    lines += ["", "diffusers checkpoints (--backbone DIR, by model_index.json):"]
    lines += [f"  {name:<26} {'yes' if ok else 'no (needs a newer diffusers)'}" for name, ok in info["pipelines"].items()]
    lines += ["", f"GPU: {info['gpu'] or 'none usable by torch'}"]
    lines.append(f"requested backend (SFGRPO_BACKEND): {info['backend_requested']}")
    lines.append(f"Triton interpreter (TRITON_INTERPRET): {'on' if info['triton_interpreter'] else 'off'}")
    for device, table in info["available"].items():
        lines.append(f"backends usable on {device}:")
        for name, (usable, reason) in table.items():
            lines.append(f"  {name:<10} {'yes' if usable else 'no '}  {reason}")
    lines += ["", "backend each op will use:"]
    if not info["ops"]:
        lines.append("  (no ops registered)")
    for op, per_device in info["ops"].items():
        lines.append(f"  {op:<24} " + "  ".join(f"{d}: {b}" for d, b in per_device.items()))
    lines += ["", "switches:"]
    lines += [f"  {name:<30} {value}" for name, value in info.get("switches", {}).items()]
    lines += ["", "DiT blocks under --fused-norms (their gated residuals and norm2, FLUX attention's QK-norm + "
                  "rotation, through sfgrpo's ops):"]
    lines += [f"  {name:<30} {value}" for name, value in info.get("fused_blocks", {}).items()]
    lines += ["", f"LoRA layers under --fused-lora: {info.get('fused_lora', 'unknown')}"]
    return "\n".join(lines)
