"""The Fashion-MNIST judge: a small CNN on the luminance of an image that names its class.

It measures whether the base model draws the class it is asked for. It sees only luminance (the max
channel, normalised per image), so colour, shade and the stripes' dimming do not change its answer:
trained on luminance of colourised renders, it reads catalogue items and generated images alike.
About 91% on the Fashion-MNIST test split. Trained by `perfusion pretrain base --stage classifier`,
shipped in assets/embedded_base/classifier/.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from torch.nn import functional as F


ITEM_SIZE = 28  # Fashion-MNIST items; FashionWorld canvases put them in the centre with a 2-pixel border


def to_luminance(images: np.ndarray) -> np.ndarray:
    """RGB images [N, S, S, 3] (uint8 or float in [0, 1]) -> float32 [N, 1, 28, 28] in [0, 1].

    Max channel (render() scales the grey mask by the colour, so the max channel is the mask times a
    constant), divided by the image's 99.5th percentile so light, dark and generated images agree,
    then the central 28x28 (a 32x32 canvas) or a resize (other sizes).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    rgb = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    lum = rgb.max(-1)
    scale = np.percentile(lum.reshape(len(lum), -1), 99.5, axis=1)[:, None, None]
    lum = np.clip(lum / np.maximum(scale, 1e-3), 0.0, 1.0)
    size = lum.shape[1]
    if size == ITEM_SIZE + 4:
        lum = lum[:, 2:-2, 2:-2]
    elif size != ITEM_SIZE:
        inner = max(ITEM_SIZE, round(size * ITEM_SIZE / (ITEM_SIZE + 4)))
        border = (size - inner) // 2
        lum = np.stack([np.asarray(Image.fromarray(x[border:border + inner, border:border + inner]).resize(
            (ITEM_SIZE, ITEM_SIZE), Image.BILINEAR)) for x in lum])
    return np.ascontiguousarray(lum[:, None], dtype=np.float32)


class FashionClassifier(ModelMixin, ConfigMixin):
    """conv16-conv16-pool-conv32-conv32-pool-fc128-fc10 (width 16) with batch norm and dropout."""

    @register_to_config
    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 128, dropout: float = 0.3):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), block(width, width), nn.MaxPool2d(2),
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, luminance: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] in [0, 1] -> logits [B, num_classes]."""
        return self.head(self.features(luminance * 2.0 - 1.0))

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """RGB images [N, S, S, 3] -> class probabilities [N, 10]."""
        was_training = self.training
        self.eval()
        lum = to_luminance(images)
        out = [F.softmax(self(torch.from_numpy(lum[i:i + batch_size]).to(self.dtype)), -1).float().numpy()
               for i in range(0, len(lum), batch_size)]
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.config.num_classes), np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """RGB images [N, S, S, 3] -> class indices [N] (models/class_names.py: CLASS_NAMES)."""
        return self.predict_proba(images).argmax(1)


def load_classifier(path=None) -> FashionClassifier:
    """The shipped judge (assets/embedded_base/classifier) or one saved at `path`, in eval mode."""
    from perfusion_ray.models.base import EMBEDDED_DIR

    model = FashionClassifier.from_pretrained(str(path or EMBEDDED_DIR / "classifier"))
    return model.float().eval()
