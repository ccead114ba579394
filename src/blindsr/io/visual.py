"""Pictures for humans: contact sheets (LR | SR | HR side by side) and blur-kernel images.

Resizing policy of :func:`contact_sheet`: every panel is brought to a common height. Panels that are
enlarged use nearest-neighbour, so the pixels of a tiny LR input stay visible as blocks (no invented
smoothness); panels that are shrunk use Pillow's antialiased bicubic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from blindsr.io.images import atomic_write, write_image

LABEL_HEIGHT = 20          # px of the label strip above each panel
GAP = 8                    # px between panels (and between rows of a grid)
BACKGROUND = (255, 255, 255)
LABEL_BG, LABEL_FG = (32, 32, 32), (255, 255, 255)

# Viridis (matplotlib's default colormap), approximated by 9 control points, linearly interpolated.
_VIRIDIS = np.array([
    [0.267, 0.005, 0.329], [0.282, 0.141, 0.458], [0.230, 0.322, 0.546], [0.173, 0.449, 0.558],
    [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.369, 0.789, 0.383], [0.678, 0.864, 0.190],
    [0.993, 0.906, 0.144],
])


def contact_sheet(images: Sequence[torch.Tensor], labels: Sequence[str] | None = None,
                  path: str | Path | None = None, *, height: int | None = None, overwrite: bool = False,
                  gap: int = GAP, label_height: int = LABEL_HEIGHT) -> torch.Tensor:
    """Panels side by side, each resized to ``height`` (default: the tallest), a label strip above each.

    ``images``: (3,H,W) or (1,H,W) tensors in [0,1]. Returns the sheet (3, label_height + height,
    sum(widths) + gap * (n - 1)) float32; also written atomically to ``path`` when given.
    """
    if not images:
        raise ValueError("contact_sheet: no images")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"contact_sheet: {len(images)} images but {len(labels)} labels")
    height = height or max(img.shape[-2] for img in images)
    strip = label_height if labels is not None else 0
    panels = [_resize_to_height(_to_pil(img), height) for img in images]
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, strip + height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = 0
    for i, panel in enumerate(panels):
        sheet.paste(panel, (x, strip))
        if labels is not None:
            draw.rectangle([x, 0, x + panel.width - 1, strip - 1], fill=LABEL_BG)
            text = _fit_text(draw, str(labels[i]), font, panel.width - 6)
            draw.text((x + 3, strip / 2), text, fill=LABEL_FG, font=font, anchor="lm")
        x += panel.width + gap
    out = _from_pil(sheet)
    if path is not None:
        write_image(path, out, overwrite=overwrite)
    return out


def contact_grid(rows: Sequence[Sequence[torch.Tensor]], labels: Sequence[Sequence[str]] | None = None,
                 path: str | Path | None = None, *, height: int | None = None, overwrite: bool = False,
                 gap: int = GAP) -> torch.Tensor:
    """Several :func:`contact_sheet` rows stacked vertically (left-aligned, ``gap`` between rows)."""
    if not rows:
        raise ValueError("contact_grid: no rows")
    sheets = [contact_sheet(r, None if labels is None else labels[i], height=height, gap=gap)
              for i, r in enumerate(rows)]
    width = max(s.shape[-1] for s in sheets)
    total = sum(s.shape[-2] for s in sheets) + gap * (len(sheets) - 1)
    grid = torch.ones(3, total, width)
    y = 0
    for s in sheets:
        grid[:, y:y + s.shape[-2], :s.shape[-1]] = s
        y += s.shape[-2] + gap
    if path is not None:
        write_image(path, grid, overwrite=overwrite)
    return grid


def kernel_image(kernel: torch.Tensor | np.ndarray, size: int | None = None, *, scale: int = 8,
                 cmap: str = "viridis") -> torch.Tensor:
    """A (h,w) blur kernel as a (3,H,W) picture: normalised to max 1, nearest-upsampled, colour-mapped.

    Negative taps are shown as 0. ``size``: length of the longer side in pixels (default ``scale`` pixels
    per tap). ``cmap``: "viridis" or "gray".
    """
    k = torch.as_tensor(np.asarray(kernel.detach().cpu() if isinstance(kernel, torch.Tensor) else kernel),
                        dtype=torch.float64)
    if k.ndim != 2:
        raise ValueError(f"kernel_image: expected a (h, w) kernel, got shape {tuple(k.shape)}")
    k = k.clamp(min=0)
    peak = k.max()
    k = k / peak if peak > 0 else k
    h, w = k.shape
    out_hw = (h * scale, w * scale) if size is None else (max(1, round(size * h / max(h, w))),
                                                         max(1, round(size * w / max(h, w))))
    k = torch.nn.functional.interpolate(k[None, None], size=out_hw, mode="nearest-exact")[0, 0]
    return colormap(k, cmap).float()


def colormap(x: torch.Tensor, name: str = "viridis") -> torch.Tensor:
    """Map (H,W) values in [0,1] to (3,H,W) colours: "gray" or "viridis" (piecewise-linear)."""
    x = x.clamp(0, 1)
    if name == "gray":
        return x.expand(3, *x.shape).clone()
    if name != "viridis":
        raise ValueError(f"colormap: unknown colormap {name!r} (use 'viridis' or 'gray')")
    points = torch.as_tensor(_VIRIDIS, dtype=x.dtype, device=x.device)
    pos = x * (len(points) - 1)
    lo = pos.floor().long().clamp(max=len(points) - 2)
    frac = (pos - lo)[..., None]
    rgb = points[lo] * (1 - frac) + points[lo + 1] * frac
    return rgb.permute(2, 0, 1)


def save_kernel(kernel: torch.Tensor | np.ndarray, path_png: str | Path, also_npy: bool = True, *,
                size: int | None = None, cmap: str = "viridis", overwrite: bool = True) -> list[Path]:
    """Write :func:`kernel_image` to ``path_png`` and, with ``also_npy``, the raw float32 taps beside it."""
    path_png = Path(path_png)
    written = [write_image(path_png, kernel_image(kernel, size, cmap=cmap), overwrite=overwrite)]
    if also_npy:
        npy = path_png.with_suffix(".npy")
        arr = np.asarray(kernel.detach().cpu() if isinstance(kernel, torch.Tensor) else kernel, np.float32)
        with atomic_write(npy, "wb", overwrite=overwrite) as f:
            np.save(f, arr)
        written.append(npy)
    return written


def _to_pil(img: torch.Tensor) -> Image.Image:
    img = img.detach().to("cpu", torch.float32)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"contact_sheet: expected (3,H,W) or (1,H,W) images, got shape {tuple(img.shape)}")
    a = img.nan_to_num(0).clamp(0, 1).mul(255).round().to(torch.uint8).expand(3, -1, -1)
    return Image.fromarray(a.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


def _resize_to_height(im: Image.Image, height: int) -> Image.Image:
    if im.height == height:
        return im
    width = max(1, round(im.width * height / im.height))
    resample = Image.Resampling.NEAREST if height > im.height else Image.Resampling.BICUBIC
    return im.resize((width, height), resample)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """``text``, shortened with an ellipsis until it fits ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..." if text else ""
