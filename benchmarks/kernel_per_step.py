"""Kernel estimate quality of the embedded BlindDiff models, per sampling step, on Gaussian8 test images.

    python benchmarks/kernel_per_step.py --models blinddiff-s blinddiff-s-real --set Set14 --crop 192 \
        --plot docs/images/kernel_l1_per_step.png

Each image of ``--set`` (``../shared/data/val``) is centre-cropped to ``--crop`` HR pixels, degraded with each of
the 8 Gaussian8 kernels (sigma 1.8 .. 3.2, bicubic x4), and super-resolved with the model's own defaults (seed
per kernel). Printed per model: sum|k_hat - k| at every sampling step (the kernel MCFormer estimates from x_t),
for the last step's estimate (``kernel_estimate="model"``, the paper's), for the mean of all steps' estimates and
for the shipped estimate (``kernel_estimate="fit"``: the Gaussian fitted to the SR output and the LR input,
``degradations/kernel_fit.py``), against two baselines that
use no image: the best single Gaussian for the 8 kernels (sigma 2.6) and the delta kernel. ``--plot`` draws the
per-step curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations.kernels import (  # noqa: E402
    GAUSSIAN8_SIGMAS,
    gaussian8_kernels,
    gaussian_kernel,
    kernel_moments,
)
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.io.images import list_images, read_image, write_bytes_atomic  # noqa: E402
from blindsr.methods.blinddiff import load_pipeline  # noqa: E402
from blindsr.weights import EMBEDDED, embedded_path  # noqa: E402


def l1(k_hat: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (k_hat - k).abs().flatten(-2).sum(-1)


def moment_gaussian(k: torch.Tensor) -> torch.Tensor:
    """The centred Gaussian with the covariance of each kernel (..., n, n) (a projection onto Gaussians)."""
    _, cov = kernel_moments(k)
    n = k.shape[-1]
    r = torch.arange(n, dtype=torch.float64) - n // 2
    p = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1)  # (n, n, 2) as (x, y)
    inv = torch.linalg.inv(cov)[..., None, None, :, :]
    g = torch.exp(-0.5 * (p[..., None, :] @ inv @ p[..., :, None])[..., 0, 0])
    return (g / g.sum((-2, -1), keepdim=True)).to(k.dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(EMBEDDED))
    ap.add_argument("--set", default="Set14")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "val"))
    ap.add_argument("--crop", type=int, default=192, help="HR centre crop (0 = whole images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=0, help="only the first N images (0 = all)")
    ap.add_argument("--plot", help="PNG of the per-step curves")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--sheet", help="PNG: the 8 true kernels, then per model its last-step and its fitted "
                    "estimates on the first image")
    ap.add_argument("--save-kernels", help="torch file of every estimate: {model: (images, steps, 8, 21, 21)}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    kernels = gaussian8_kernels()  # (8, 21, 21)
    fixed = l1(gaussian_kernel(21, 2.6)[None], kernels).mean().item()
    delta = torch.zeros(21, 21)
    delta[10, 10] = 1
    print(f"# {args.set}-Gaussian8, crops {args.crop or 'whole'}; baselines: best fixed Gaussian (sigma 2.6) "
          f"{fixed:.3f}, delta {l1(delta[None], kernels).mean().item():.3f}")
    g8 = get_preset("gaussian8")
    files, _ = list_images([Path(args.data) / args.set])
    files = files[: args.images] if args.images else files
    results = {"baseline_fixed_sigma2.6": fixed, "models": {}}
    raw = {}
    sheet_rows, sheet_labels = [list(kernels)], [[f"true sigma {s}" for s in GAUSSIAN8_SIGMAS]]
    for m in args.models:
        pipe = load_pipeline(embedded_path(m) if m in EMBEDDED else m)
        per_step, of_mean, fitted = [], [], []  # (images, steps, 8), (images, 8), (images, 8)
        for i, f in enumerate(files):
            hr = read_image(f)[:3]
            if args.crop:
                c = min(args.crop, *hr.shape[-2:]) // 4 * 4
                top, left = (hr.shape[-2] - c) // 2, (hr.shape[-1] - c) // 2
                hr = hr[:, top:top + c, left:left + c]
            lr = g8(hr[None]).lr
            gens = [torch.Generator().manual_seed(1009 * i + j) for j in range(8)]
            out = pipe(lr, generator=gens, return_trajectory=True, kernel_estimate="fit")
            traj = out.kernels_traj  # (steps, 8, 21, 21)
            fitted.append(l1(out.kernel, kernels))
            if i == 0:
                short = m.removeprefix("blinddiff-").upper() if m in EMBEDDED else Path(m).stem[:8]
                for name, ks in (("net", traj[-1]), ("fit", out.kernel)):
                    sheet_rows.append(list(ks))
                    sheet_labels.append([f"{short} {name} L1 {v:.2f}" for v in l1(ks, kernels).tolist()])
            per_step.append(l1(traj, kernels[None]))
            raw.setdefault(m, []).append(traj)
            of_mean.append(l1(traj.mean(0), kernels))
        steps = torch.stack(per_step)
        curve = steps.mean((0, 2))
        avg = torch.stack(of_mean).mean().item()
        lasts = torch.stack([t[-1] for t in raw[m]])  # (images, 8, 21, 21)
        sigma_hat = kernel_moments(lasts)[1].diagonal(dim1=-2, dim2=-1).mean(-1).sqrt().mean(0)  # per true sigma
        proj = l1(moment_gaussian(lasts), kernels).mean().item()
        fit = torch.stack(fitted)
        results["models"][m] = {"per_step": curve.tolist(), "last": curve[-1].item(), "mean_of_steps": avg,
                                "fit": fit.mean().item(), "per_sigma_fit": fit.mean(0).tolist(),
                                "per_sigma_last": steps[:, -1].mean(0).tolist(), "moment_gaussian_last": proj,
                                "sigma_hat_last": sigma_hat.tolist()}
        print(f"{m}: per step " + " ".join(f"{v:.3f}" for v in curve.tolist()) + f"; model (last) "
              f"{curve[-1]:.3f}; mean of the steps' kernels {avg:.3f}; last per sigma " + " ".join(
                  f"{s}:{v:.2f}" for s, v in zip(GAUSSIAN8_SIGMAS, steps[:, -1].mean(0).tolist(), strict=True)),
              flush=True)
        print(f"  shipped (fit to SR and LR) {fit.mean():.3f}; per sigma " + " ".join(
            f"{s}:{v:.2f}" for s, v in zip(GAUSSIAN8_SIGMAS, fit.mean(0).tolist(), strict=True)), flush=True)
        print(f"  the last estimate as a Gaussian of its own covariance: {proj:.3f}; its sigma per true sigma "
              + " ".join(f"{s}:{v:.2f}" for s, v in zip(GAUSSIAN8_SIGMAS, sigma_hat.tolist(), strict=True)), flush=True)
    if args.plot:
        import csv
        import tempfile

        from blindsr.train.logging import plot_losses

        names = list(results["models"])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "curves.csv"
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                fits = [f"{n} (shipped: Gaussian fit to SR and LR)" for n in names]
                w.writerow(["step", *names, *fits, "best fixed Gaussian"])
                for j in range(len(results["models"][names[0]]["per_step"])):
                    w.writerow([j + 1, *(results["models"][n]["per_step"][j] for n in names),
                                *(results["models"][n]["fit"] for n in names), fixed])
            plot_losses(path, args.plot, keys=[*names, *fits, "best fixed Gaussian"], log_y=False)
    if args.sheet:
        from blindsr.io.visual import contact_grid, kernel_image

        contact_grid([[kernel_image(k, scale=6) for k in row] for row in sheet_rows], sheet_labels, args.sheet,
                     overwrite=True)
    if args.save_kernels:
        torch.save({m: torch.stack(v) for m, v in raw.items()}, args.save_kernels)
    if args.json:
        write_bytes_atomic(Path(args.json), json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
