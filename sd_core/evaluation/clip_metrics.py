"""CLIP score and a CLIP-space Fréchet distance (the sd15 profile's prompt metrics).

- **CLIP score**: 100 × cosine between the CLIP image embedding of a generated image and the CLIP text
  embedding of its prompt, floored at 0 and averaged (the convention of Hessel et al. 2021 and torchmetrics'
  ``CLIPScore``). The prompts are captions of held-out samples (never trained on), fixed per run.
- **CLIP-FD**: the Fréchet distance between Gaussians fitted to the CLIP image embeddings of the generated
  images and of held-out real images (FID's formula on CLIP features instead of Inception features). It needs
  no weights beyond the CLIP model the text encoder comes from, so it works offline wherever the text encoder
  does. The reference images are the held-out *latents decoded by the frozen VAE*: the pipeline keeps latents,
  not pixels, past encoding, and the VAE's reconstructions are also the best any model decoded by it can do.
  With few images (the default 64) the distance is biased upwards; it compares checkpoints of one run at a
  fixed image count, not runs with different counts.

The standard Inception FID is the option `sd_core.evaluation.inception_fid` adds when the user supplies
pytorch-fid's weights file (``checkpoint_eval``'s ``inception_weights``): pytorch-fid's TF-ported FID Inception
network rebuilt in plain torch, on the same generated and held-out images, through :func:`frechet_distance`.

Model: ``transformers.CLIPModel`` (ViT-L/14 for SD 1.x: ``openai/clip-vit-large-patch14``, the repository
the sd15 text encoder is loaded from). Images are preprocessed by transformers' own CLIP image processor
(resize the short side, centre crop, OpenAI mean/std) built from the vision config's image size, so a model
folder without a preprocessor file works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import linalg


class ClipModelError(ValueError):
    """The CLIP model for the sd15 metrics cannot be loaded from the given source."""


def load_clip(source: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A frozen ``CLIPModel`` (vision and text towers with their projections) from a hub id or folder."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(source, **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError) as exc:
        raise ClipModelError(
            f"cannot load a CLIPModel (image and text towers) from {source!r} for CLIP score / CLIP-FD: {exc}. "
            f"Point checkpoint_eval's clip_model at a full CLIP folder or hub id "
            f"(e.g. openai/clip-vit-large-patch14)") from exc
    return model.to(device).eval().requires_grad_(False)


def image_processor(model: Any) -> Any:
    """transformers' CLIP preprocessing at the model's input size (OpenAI's mean and std are its defaults)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = int(model.config.vision_config.image_size)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _param(model: Any) -> torch.Tensor:
    return next(model.parameters())


@torch.no_grad()
def image_embeddings(model: Any, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, projection_dim), float32 on the CPU."""
    proc, p = image_processor(model), _param(model)
    out = []
    for i in range(0, len(images), batch_size):
        px = proc(images=[im.convert("RGB") for im in images[i:i + batch_size]], return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=px.to(p.device, p.dtype)).pooler_output
        out.append(model.visual_projection(pooled).float().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def text_embeddings(model: Any, token_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (N, projection_dim) of tokenised prompts (the profile's tokenizer)."""
    p = _param(model)
    out = []
    for i in range(0, token_ids.shape[0], batch_size):
        pooled = model.text_model(input_ids=token_ids[i:i + batch_size].to(p.device)).pooler_output
        out.append(model.text_projection(pooled).float().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean of max(100 × cos(image, its prompt), 0) over matching rows of unit-norm embeddings."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"{tuple(image_emb.shape)} image embeddings for {tuple(text_emb.shape)} text embeddings")
    return float((100.0 * (image_emb * text_emb).sum(-1)).clamp_min(0).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½) between Gaussians fitted to the rows of ``a`` and ``b``.

    With fewer samples than dimensions both covariances are singular: as pytorch-fid does, ``eps`` is added
    to their diagonals when the product's square root is not finite, and a negligible imaginary part (numerical
    noise) is dropped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two sets of at least 2 embeddings of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.shape[1]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


@dataclass
class ClipMetrics:
    """CLIP score of generated images against their prompts, and their CLIP-FD to the reference images."""

    clip_score: float
    clip_fd: float
    n: int

    def as_metadata(self) -> dict[str, float | int]:
        return {"clip_score": round(self.clip_score, 4), "clip_fd": round(self.clip_fd, 4), "clip_n": self.n}


def clip_metrics(model: Any, generated: Sequence[Image.Image], prompt_ids: torch.Tensor,
                 reference_emb: torch.Tensor) -> ClipMetrics:
    """Both metrics for ``generated`` images (one per row of ``prompt_ids``) against the reference embeddings
    (`image_embeddings` of the held-out real images, computed once per evaluation)."""
    img = image_embeddings(model, generated)
    txt = text_embeddings(model, prompt_ids)
    return ClipMetrics(clip_score(img, txt), frechet_distance(img.numpy(), reference_emb.numpy()), len(generated))
