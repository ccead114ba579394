"""How close synthetic LR images are to a camera's real ones, without any downloaded network (issue 12's report).

- **Patches**: random ``size`` x ``size`` patches of the LR images, each minus its own mean (the distributions
  then compare texture, noise and blur rather than the scenes' colours), flattened.
- **Distance**: the sliced Wasserstein distance (SWD) between the two patch sets: the mean, over random unit
  directions, of the 1-D Wasserstein-1 distance between the projected sets (PGGAN's image-statistics distance
  without its Laplacian pyramid). 0 for identical sets; it needs no network, so it runs offline.
- **Picture**: PCA to 50 dimensions, then t-SNE to 2 (exact, in torch; the paper's Fig. 8), drawn with Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def patches(images: Sequence[Tensor], size: int = 8, per_image: int = 64,
            generator: torch.Generator | None = None) -> Tensor:
    """(N, 3 size²) mean-removed patches, ``per_image`` from each (3, h, w) image (images smaller than a patch
    are skipped)."""
    out = []
    for img in images:
        h, w = img.shape[-2:]
        if h < size or w < size:
            continue
        ys = torch.randint(0, h - size + 1, (per_image,), generator=generator)
        xs = torch.randint(0, w - size + 1, (per_image,), generator=generator)
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            p = img[:, y:y + size, x:x + size].reshape(-1).float()
            out.append(p - p.mean())
    if not out:
        raise ValueError(f"no image is {size}x{size} or larger")
    return torch.stack(out)


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 512, generator: torch.Generator | None = None
                       ) -> float:
    """SWD between point sets (n, d) and (m, d): both are resampled to the smaller size by sorted-quantile
    interpolation along each direction."""
    d = a.shape[1]
    dirs = torch.randn(d, projections, generator=generator, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (x.double() @ dirs for x in (a, b))
    n = min(len(a), len(b))
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    qa = torch.quantile(pa, q, dim=0)
    qb = torch.quantile(pb, q, dim=0)
    return float((qa - qb).abs().mean())


def pca(x: Tensor, k: int = 50) -> Tensor:
    """The first ``k`` principal components of (n, d) (centred; k is capped by n and d)."""
    x = x.double() - x.double().mean(0)
    k = min(k, *x.shape)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def _affinities(x: Tensor, perplexity: float) -> Tensor:
    """Symmetric t-SNE input affinities P (n, n): each point's Gaussian precision β found by bisection so that
    its conditional distribution has the given perplexity."""
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    d2 = torch.cdist(x, x).pow(2).masked_fill(eye, math.inf)
    d2 = d2 - d2.min(1, keepdim=True).values  # (a per-row shift does not change the normalised rows)
    target = math.log(perplexity)
    beta, lo, hi = (torch.full((n, 1), v, dtype=x.dtype) for v in (1.0, 0.0, math.inf))
    for _ in range(64):
        p = torch.exp(-d2 * beta)
        p = p / p.sum(1, keepdim=True)
        h = -(p * torch.log(p.clamp_min(1e-300))).sum(1, keepdim=True)  # entropy in nats
        flat = h > target  # too flat: raise β
        lo, hi = torch.where(flat, beta, lo), torch.where(flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    return ((p + p.T) / (2 * n)).clamp_min(1e-12)


def tsne(x: Tensor, dims: int = 2, perplexity: float = 30.0, iters: int = 400, generator: torch.Generator | None = None
         ) -> Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008): early exaggeration 12 for the first 100 steps, momentum
    0.5 -> 0.8, learning rate max(n / 12, 50). Returns (n, dims)."""
    x = x.double()
    n = x.shape[0]
    p = _affinities(x, min(perplexity, (n - 1) / 3)).float()  # the descent itself in fp32 (fast enough to plot)
    y = torch.randn(n, dims, generator=generator) * 1e-4
    vel, lr = torch.zeros_like(y), max(n / 12, 50.0)
    eye = torch.eye(n, dtype=torch.bool)
    for it in range(iters):
        num = 1 / (1 + torch.cdist(y, y).pow(2))
        num = num.masked_fill(eye, 0)
        q = (num / num.sum()).clamp_min(1e-12)
        pp = p * (12.0 if it < 100 else 1.0)
        w = (pp - q) * num
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)
        vel = (0.5 if it < 250 else 0.8) * vel - lr * grad
        y = y + vel
        y = y - y.mean(0)
    return y


def scatter_png(groups: dict[str, Tensor], path: str | Path, size: int = 640, title: str = "") -> Path:
    """A scatter plot of 2-D points per group (legend top-left), written atomically as PNG."""
    from PIL import Image, ImageDraw

    from blindsr.io.images import atomic_write

    pts = torch.cat(list(groups.values()))
    lo, hi = pts.min(0).values, pts.max(0).values
    scale = (size - 60) / (hi - lo).clamp_min(1e-9)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    for i, (name, g) in enumerate(groups.items()):
        c = COLOURS[i % len(COLOURS)]
        for x, y in ((g - lo) * scale + 30).tolist():
            d.ellipse([x - 2, size - y - 2, x + 2, size - y + 2], fill=c)
        d.rectangle([10, 10 + 16 * i, 20, 20 + 16 * i], fill=c)
        d.text((26, 9 + 16 * i), f"{name} ({len(g)})", fill="black")
    if title:
        d.text((10, size - 18), title, fill="black")
    with atomic_write(path, "wb", overwrite=True) as fh:
        img.save(fh, format="PNG")
    return Path(path)




def make_report(real_lr: Sequence[Tensor], synthetic: Sequence[Tensor], baseline: Sequence[Tensor] | None,
                out_dir: str | Path, seed: int = 0, baseline_name: str = "realesrgan") -> dict[str, float]:
    """``out_dir``/side_by_side.png (real LR crops | synthetic LR crops), distribution.png (PCA -> t-SNE of
    patches: real, synthetic and, when given, the baseline preset's LR) and report.md; returns the SWDs."""
    from blindsr.io.visual import contact_sheet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sets = {"real LR": list(real_lr), "UDDM": list(synthetic)}
    if baseline:
        sets[baseline_name] = list(baseline)
    feats = {k: patches(v, 8, max(4, 1000 // max(len(v), 1)), g) for k, v in sets.items()}
    swd = {k: sliced_wasserstein(feats["real LR"], f, generator=torch.Generator().manual_seed(seed))
           for k, f in feats.items() if k != "real LR"}
    n = min(300, *(len(f) for f in feats.values()))  # points per set in the picture (t-SNE is O(n²))
    picks = {k: f[torch.randperm(len(f), generator=g)[:n]] for k, f in feats.items()}
    y = tsne(pca(torch.cat(list(picks.values())), 50), generator=g)
    groups, i = {}, 0
    for k in picks:
        groups[k], i = y[i:i + n], i + n
    scatter_png(groups, out / "distribution.png", title="PCA -> t-SNE of 8x8 LR patches (mean removed)")
    crop = min(64, *(min(x.shape[-2:]) for v in sets.values() for x in v))
    panels, labels = [], []
    for k, v in sets.items():
        for x in v[:3]:
            panels.append(x[:, :crop, :crop])
            labels.append(k)
    contact_sheet(panels, labels, out / "side_by_side.png", height=4 * crop, overwrite=True)
    lines = ["# UDDM report", "", "Sliced Wasserstein distance between 8x8 LR patches (mean removed) and the real "
             "LR photos' (lower = closer; no network involved):", "", "| LR images | SWD to the real LR |",
             "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in swd.items()]
    lines += ["", "![distribution](distribution.png)", "", "![side by side](side_by_side.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return swd


__all__ = ["patches", "sliced_wasserstein", "pca", "tsne", "scatter_png", "make_report"]
