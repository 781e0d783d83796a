"""The built-in reward model: a multinomial logistic regression on the 8x8 digits
("does the image show the requested digit?"), fitted by `python -m sfgrpo.models.train_digits`
and shipped as safetensors (`weight [10, 64]`, `bias [10]`) next to the backbone."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"


class DigitClassifier(nn.Module):
    """Logits over the 10 digits for images in [0, 1] of shape `[B, 1, 8, 8]`."""

    def __init__(self, num_pixels: int = 64, num_classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(num_pixels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        # fitted on pixels in [-1, 1], the backbone's latent scale
        pixels = images.float().flatten(1) * 2.0 - 1.0
        return self.linear(pixels)

    def class_probability(self, images: Tensor, labels: Tensor) -> Tensor:
        """p(label | image) per row."""
        return self(images).softmax(dim=-1).gather(1, labels[:, None].to(images.device)).squeeze(1)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.linear.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitClassifier":
        from safetensors.torch import load_file

        from sfgrpo.models.digits import asset_dir

        path = Path(path) if path is not None else asset_dir() / CLASSIFIER_WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"no digit classifier at {path}; run `python -m sfgrpo.models.train_digits`")
        state = load_file(str(path))
        model = cls(state["weight"].shape[1], state["weight"].shape[0])
        model.linear.load_state_dict(state)
        return model.eval().requires_grad_(False)
