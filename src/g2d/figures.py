"""PNG figures: Fig.-4-style attention / pseudo-mask panels, grounding overlays, loss curves."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402


def attention_panels(images: Tensor, attention: Tensor, masks: Tensor, reports: Sequence[str],
                     path: str | Path, targets: Tensor | None = None) -> Path:
    """One row per image: image | head-averaged attention map | pseudo mask | report text.

    :param images: [B, 1, H, W]. :param attention: [B, heads, h, w]. :param masks: [B, K, H, W].
    :param targets: optional [B, H, W] finding masks, outlined in green on the three image panels.
    """
    n = images.shape[0]
    att = F.interpolate(attention.float().mean(1, keepdim=True), size=images.shape[-2:],
                        mode="bilinear", align_corners=False)
    fig, axes = plt.subplots(n, 4, figsize=(13, 3.2 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for i in range(n):
        img = images[i, 0].cpu().numpy()
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(att[i, 0].cpu().numpy(), cmap="jet", alpha=0.45)
        axes[i, 2].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(masks[i].float().mean(0).cpu().numpy(), cmap="Reds", alpha=0.5, vmin=0, vmax=1)
        axes[i, 3].text(0.0, 1.0, textwrap.fill(reports[i], 48), va="top", fontsize=9, wrap=True)
        if targets is not None and targets[i].any():
            for ax in axes[i, :3]:
                ax.contour(targets[i].cpu().float().numpy(), levels=[0.5], colors="lime", linewidths=1)
        for ax in axes[i]:
            ax.axis("off")
    for ax, title in zip(axes[0], ("image", "attention (mean of heads)", "pseudo mask", "report")):
        ax.set_title(title)
    return _save(fig, path)


def grounding_panels(images: Tensor, heat: Tensor, targets: Tensor, prompts: Sequence[str],
                     path: str | Path) -> Path:
    """image + ground-truth outline | similarity heat map overlay, titled by the prompt.

    :param images: [B, 1, H, W]. :param heat: [B, H, W]. :param targets: [B, H, W].
    """
    n = images.shape[0]
    fig, axes = plt.subplots(n, 2, figsize=(6.5, 3.2 * n), squeeze=False)
    for i in range(n):
        img = images[i, 0].cpu().numpy()
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].contour(targets[i].cpu().float().numpy(), levels=[0.5], colors="lime", linewidths=1)
        axes[i, 0].set_title(textwrap.fill(prompts[i], 36), fontsize=9)
        axes[i, 1].imshow(img, cmap="gray", vmin=0, vmax=1)
        shown = axes[i, 1].imshow(heat[i].cpu().numpy(), cmap="jet", alpha=0.45)
        fig.colorbar(shown, ax=axes[i, 1], fraction=0.046, pad=0.02).set_label("cosine similarity", fontsize=8)
        axes[i, 1].set_title(textwrap.fill(f"similarity to: {prompts[i]}", 36), fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    return _save(fig, path)


def prompt_panels(images: Sequence[np.ndarray], heats: Sequence[Sequence[np.ndarray]], prompts: Sequence[str],
                  path: str | Path, titles: Sequence[str] | None = None, unit: str = "cosine") -> Path:
    """One row per image: the image, then its heat map for each prompt (:func:`heat_overlay`, at the
    image's own pixels), titled by the prompt and the map's range.

    :param images: ``[H_i, W_i]`` in [0, 1] each (sizes may differ). :param heats: per image, one
        ``[H_i, W_i]`` map per prompt (NaN: no value, drawn without overlay).
    :param titles: per image, for the first column (e.g. the file name).
    """
    n, k = len(images), len(prompts)
    fig, axes = plt.subplots(n, k + 1, figsize=(3.2 * (k + 1), 3.4 * n), squeeze=False)
    for i, img in enumerate(images):
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=9)
        for j, prompt in enumerate(prompts):
            heat = heats[i][j]
            axes[i, j + 1].imshow(heat_overlay(img, heat))
            lo, hi = (np.nanmin(heat), np.nanmax(heat)) if np.isfinite(heat).any() else (np.nan, np.nan)
            title = textwrap.fill(textwrap.shorten(prompt, 120, placeholder=" …"), 34)
            axes[i, j + 1].set_title(f"{title}\n{lo:.3f} (blue) .. {hi:.3f} (red) {unit}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    return _save(fig, path)


def loss_curves(curves: Mapping[str, Sequence[float]], path: str | Path, xlabel: str = "logged step"
                ) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), list(values), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["attention_panels", "grounding_panels", "prompt_panels", "loss_curves", "heat_overlay"]


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, legend: str | None = None,
                 unit: str | None = "cosine") -> np.ndarray:
    """uint8 RGB: gray ``image`` [H, W] in [0, 1] with ``heat`` [H, W] (min-max over its finite
    values, jet colours) blended on top; NaN pixels keep the plain image. The top ``H`` rows keep the
    image's own pixel grid (matplotlib figures resample, so this is drawn by hand).

    :param legend: the prompt; when given, a strip below the image names it and shows the colour bar
        from the map's lowest to its highest value, so ``[H + strip, W, 3]``.
    :param unit: the values' unit after the highest one ("cosine"); ``None``: no colour bar.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    finite = np.isfinite(heat)
    lo, hi = (float(heat[finite].min()), float(heat[finite].max())) if finite.any() else (0.0, 1.0)
    norm = np.where(finite, (heat - lo) / max(hi - lo, 1e-12), 0.0)
    colour = colormaps["jet"](norm)[..., :3]
    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    a = np.where(finite, alpha, 0.0)[..., None]
    out = (255 * ((1 - a) * gray + a * colour)).round().astype(np.uint8)
    if legend is None:
        return out
    w = out.shape[1]
    size = max(10, w // 40)
    font = ImageFont.load_default(size=size)
    strip = Image.new("RGB", (w, 3 * size + 10), "white")
    draw = ImageDraw.Draw(strip)
    text = legend
    if draw.textlength(text, font=font) > w - 4:  # cut a long prompt to the image's width, "…" marking the cut
        while text and draw.textlength(text + "…", font=font) > w - 4:
            text = text[:-1]
        text = text + "…" if text else ""  # an image narrower than the ellipsis gets no text
    draw.text((2, 1), text, fill="black", font=font)
    if unit is None:
        return np.concatenate([out, np.asarray(strip)], axis=0)
    lo_txt, hi_txt = f"{lo:.3f}", f"{hi:.3f} {unit}".rstrip()
    x0 = int(draw.textlength(lo_txt, font=font)) + 6
    x1 = w - int(draw.textlength(hi_txt, font=font)) - 6
    if x1 > x0:
        bar = (255 * colormaps["jet"](np.linspace(0, 1, x1 - x0))[:, :3]).astype(np.uint8)
        strip.paste(Image.fromarray(np.repeat(bar[None], size, axis=0)), (x0, 2 * size))
    draw.text((2, 2 * size - 1), lo_txt, fill="black", font=font)
    draw.text((max(x1 + 4, x0), 2 * size - 1), hi_txt, fill="black", font=font)
    return np.concatenate([out, np.asarray(strip)], axis=0)
