"""The standard Inception FID (optional sd15 metric): pytorch-fid's FID Inception v3 in plain torch.

FID figures are only comparable with the literature when computed with *the* network of the original
TensorFlow implementation (``inception-2015-12-05``), not torchvision's ImageNet Inception: the TF graph differs
in a few places and pytorch-fid (mseitzer/pytorch-fid, ``src/pytorch_fid/inception.py``) reproduces them as
``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1`` and ``FIDInceptionE_2``. This module rebuilds that
network without torchvision (not a dependency of this project): the building blocks follow torchvision's
``inception.py`` layout and attribute names, so pytorch-fid's weights file
``pt_inception-2015-12-05-6726825d.pth`` loads with ``load_state_dict(strict=True)``; the forward passes are
pytorch-fid's (its patches marked where they are).

Features are pytorch-fid's defaults: the 2048-d pool3 output (final average pooling) of images in [0, 1],
resized to 299 × 299 bilinearly and scaled to [-1, 1]. The distance is
:func:`sd_core.evaluation.clip_metrics.frechet_distance`, the same formula as the CLIP-space distance.

The weights are not downloaded here (the project runs offline): the user supplies the file
(``checkpoint_eval``'s ``inception_weights``). It is read with ``torch.load(weights_only=True)``, so a hostile
pickle cannot run code; a missing or different file is refused with the key-set mismatch summarised.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sd_core.evaluation.clip_metrics import frechet_distance

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
FEATURE_DIM = 2048  # pool3
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's classifier (unused for FID, but in the weights file)


class InceptionWeightsError(ValueError):
    """The FID Inception weights file is missing or is not pytorch-fid's (the message names the file)."""


# ------------------------------------------------------------------------------------------ blocks
class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, TF's) → ReLU, as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # pytorch-fid's patch: TensorFlow's average pool does not count the zero padding in its average
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """torchvision's InceptionA (Mixed_5b..5d) with TF's average pool."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a, the 35 → 17 reduction), unpatched in the FID network."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """torchvision's InceptionC (Mixed_6b..6e, factorised 7×7) with TF's average pool."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a, the 17 → 8 reduction), unpatched in the FID network."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionE(nn.Module):
    """torchvision's InceptionE layout (Mixed_7b, 7c); the two FID variants differ only in the pool branch."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801 (pytorch-fid's name)
    """Mixed_7b: InceptionE with TF's average pool."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return _tf_avg_pool(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801 (pytorch-fid's name)
    """Mixed_7c: InceptionE with a *max* pool, as the TF FID graph has it (pytorch-fid: likely an error in
    that graph, kept because FID values depend on it)."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


# ------------------------------------------------------------------------------------------ network
class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 (1008 classes, no aux logits) with the FID
    blocks swapped in. Attribute names are torchvision's, so the state dict is the weights file's; ``forward``
    returns pytorch-fid ``InceptionV3``'s default output, the pool3 features (N, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, NUM_CLASSES)  # only so that the weights file loads strictly

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features of images (N, 3, H, W) with values in [0, 1]."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # pytorch-fid's normalize_input: [0, 1] → [-1, 1]
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)


def fid_inception_v3() -> FIDInceptionV3:
    """The FID Inception network with torch's default (random) initialisation: load weights into it."""
    return FIDInceptionV3()


# ------------------------------------------------------------------------------------------ loading
def _optional_key(key: str) -> bool:
    # BatchNorm's step counter: absent from state dicts saved before torch 0.4.1, and unused in eval mode
    return key.endswith(".num_batches_tracked")


def _listed(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """What keeps ``state`` from being the FID Inception's state dict (None when it is): missing and unexpected
    keys and shape differences, summarised (a few names each, with counts)."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not _optional_key(k))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
                    if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape)
    not_tensors = sorted(k for k in expected if k in state and not isinstance(state[k], torch.Tensor))
    parts = [f"{len(missing)} missing keys: {_listed(missing)}" if missing else "",
             f"{len(unexpected)} unexpected keys: {_listed(unexpected)}" if unexpected else "",
             f"{len(shapes)} shape mismatches: {_listed(shapes, 2)}" if shapes else "",
             f"{len(not_tensors)} non-tensor values: {_listed(not_tensors)}" if not_tensors else ""]
    found = "; ".join(p for p in parts if p)
    return f"{found} (of {len(expected)} expected keys)" if found else None


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise InceptionWeightsError(
            f"FID Inception weights {path} not found: expected pytorch-fid's {WEIGHTS_FILE} (download it from "
            f"{WEIGHTS_URL} and point checkpoint_eval's inception_weights at the file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InceptionWeightsError(
            f"{path}: not a readable torch weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"expected pytorch-fid's {WEIGHTS_FILE}") from exc
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict; expected "
                                    f"pytorch-fid's {WEIGHTS_FILE}")
    return state


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception network with the weights of ``path`` (pytorch-fid's file), frozen in eval mode.

    Refuses (:class:`InceptionWeightsError` naming the file) a missing file, one torch cannot read without
    unpickling code, and any state dict whose keys or shapes are not the FID Inception's — e.g. torchvision's
    ImageNet Inception, whose FID values would not be comparable."""
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    model = fid_inception_v3()
    problem = state_dict_mismatch(model, state)
    if problem:
        raise InceptionWeightsError(f"{path}: not the FID Inception v3 weights (pytorch-fid's {WEIGHTS_FILE}): "
                                    f"{problem}")
    counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if _optional_key(k) and k not in state}
    model.load_state_dict({**state, **counters}, strict=True)  # every other key must be the file's
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ features
def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB (3, H, W) float in [0, 1], as torchvision's ``ToTensor`` in pytorch-fid's loader."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _resized(t: torch.Tensor) -> torch.Tensor:
    # the network's own first step, done per image so that images of different sizes can share a batch
    # (resizing 299 → 299 again in forward is the identity)
    return F.interpolate(t[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: Sequence[Image.Image], batch_size: int = 16) -> np.ndarray:
    """Pool3 features (N, 2048), float64 on the CPU, of PIL images of any size."""
    p = next(model.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([_resized(_to_tensor(im)) for im in images[i:i + batch_size]])
        out.append(model(batch.to(p.device, p.dtype)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


@dataclass
class InceptionReference:
    """The standard FID's fixed half: the network and the pool3 features of the reference (held-out) images."""

    model: FIDInceptionV3
    reference_features: np.ndarray

    @classmethod
    def build(cls, weights: str | Path, reference: Sequence[Image.Image],
              device: torch.device | str = "cpu") -> "InceptionReference":
        model = load_fid_inception(weights, device)
        return cls(model, inception_features(model, reference))

    def fid(self, generated: Sequence[Image.Image]) -> float:
        """FID of ``generated`` against the reference images (biased upwards at small counts, like CLIP-FD)."""
        return frechet_distance(inception_features(self.model, generated), self.reference_features)
