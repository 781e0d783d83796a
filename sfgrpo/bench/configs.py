"""Transformer configs the benchmark builds with random weights: the published diffusers configs of
SD3.5-Medium and FLUX.1-dev (written here, so nothing is downloaded), and scaled-down twins of the
same architectures that run in seconds on a CPU.

Values copied from the `transformer/config.json` of `stabilityai/stable-diffusion-3.5-medium` and
`black-forest-labs/FLUX.1-dev` on the Hugging Face Hub.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

SD35_MEDIUM = dict(
    family="sd3", sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),  # MMDiT-X: layers 0..12 add a second, image-only attention
)

FLUX1_DEV = dict(
    family="flux", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Same block types as the real ones (dual attention, qk-norm; FLUX's double + single blocks), two
# orders of magnitude fewer parameters: what a CPU can run a few iterations of.
SD35_MEDIUM_SMALL = dict(
    SD35_MEDIUM, num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
    caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=32, dual_attention_layers=(0,),
)

FLUX1_DEV_SMALL = dict(
    FLUX1_DEV, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
)

TRANSFORMERS = {
    "sd35m": SD35_MEDIUM,
    "flux1-dev": FLUX1_DEV,
    "sd35m-small": SD35_MEDIUM_SMALL,
    "flux1-dev-small": FLUX1_DEV_SMALL,
}

# what each family's pipeline feeds the transformer at 512 px: text tokens (CLIP 77 + T5 256 for
# SD3; T5 512 for FLUX) and the VAE's downsampling
TEXT_TOKENS = {"sd3": 333, "flux": 512}
VAE_SCALE = 8


def transformer_config(name: str) -> dict:
    """The diffusers constructor arguments of a named transformer (without our `family` key)."""
    if name not in TRANSFORMERS:
        raise ValueError(f"unknown transformer config {name!r}; known: {sorted(TRANSFORMERS)}")
    config = dict(TRANSFORMERS[name])
    config.pop("family")
    return config


def family(name: str) -> str:
    return TRANSFORMERS[name]["family"]


def build_transformer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers transformer of the named config with its constructor's default init. `device="meta"`
    allocates nothing (parameter counts of the 12B FLUX on any machine; the shells that
    `assign_tensors` fills). For random weights to run, `random_transformer` is much cheaper."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model_class = SD3Transformer2DModel if family(name) == "sd3" else FluxTransformer2DModel
    # built directly in `dtype` on `device`: FLUX.1-dev in fp32 first would need 48 GB before any cast
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(**transformer_config(name))
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside the block go to the meta device at once, so the constructors'
    initialisers run on nothing; buffers (SD3's sin-cos position table) are still computed for real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, parameter):
        if parameter is not None and not parameter.is_meta:
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def random_transformer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> nn.Module:
    """The named transformer with seeded random weights drawn directly on `device`, skipping the
    constructors' own init (the default init of SD3.5-M's 2.24B parameters takes ~24 s on 2 CPU
    cores). Same distributions as PyTorch's defaults: weights of linear and conv layers (and their
    biases) uniform in +-1/sqrt(fan_in), 1-d weights (norm scales) one, other 1-d tensors zero.
    Throughput does not depend on the values; these keep bf16 activations finite."""
    with _parameters_on_meta():
        module = build_transformer(name, device, dtype)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for owner in module.modules():
        weight = owner._parameters.get("weight")
        bound = 1.0 / math.sqrt(math.prod(weight.shape[1:])) if weight is not None and weight.ndim >= 2 else None
        for leaf, meta in list(owner._parameters.items()):
            if meta is None or not meta.is_meta:
                continue
            if id(meta) not in made:
                tensor = torch.empty(meta.shape, dtype=meta.dtype, device=device)
                with torch.no_grad():
                    if meta.ndim >= 2 or (bound is not None and leaf == "bias"):
                        fan_bound = bound if bound is not None else 1.0 / math.sqrt(math.prod(meta.shape[1:]))
                        tensor.uniform_(-fan_bound, fan_bound, generator=generator)
                    elif leaf == "weight":
                        tensor.fill_(1.0)
                    else:
                        tensor.zero_()
                made[id(meta)] = nn.Parameter(tensor, requires_grad=meta.requires_grad)
            owner._parameters[leaf] = made[id(meta)]
    return module


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, detached (what `assign_tensors` puts into a shell)."""
    tensors = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
    tensors.update((n, b) for n, b in module.named_buffers(remove_duplicate=False))
    return tensors


def assign_tensors(shell: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Makes `tensors` the parameters (new `Parameter` objects, frozen) and buffers of `shell` (a
    `build_transformer(..., "meta")` of the same config), sharing their storage: no copy."""
    names = set(tensors)
    expected = {n for n, _ in shell.named_parameters(remove_duplicate=False)}
    expected |= {n for n, _ in shell.named_buffers(remove_duplicate=False)}
    if names != expected:
        raise ValueError(f"weights do not fit the module: missing {sorted(expected - names)[:5]}, "
                         f"unexpected {sorted(names - expected)[:5]}")
    for name, tensor in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        owner = shell.get_submodule(prefix)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return shell


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
