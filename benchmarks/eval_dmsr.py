"""DM-SR's claims in miniature (issue 11): PSNR / SSIM (Y, border 4) and LR consistency of a DM-SR checkpoint on
Set5 / Set14 degraded x4 with the ``resshift`` and ``realesrgan`` presets, against bicubic and optional baselines;
adaptive t̂ vs fixed t (Table 3), 1 vs N steps (Table 4), and the RMSE of t̂ against its ground truth (App. A.5).

    .venv/bin/python benchmarks/eval_dmsr.py --ckpt runs/dmsr_s/final.safetensors --fixed-t 100 200 300 400 500 \\
        --steps 1 2 5 10 --baseline L1=runs/dmsr_s_l1/final.safetensors --blinddiff blinddiff-s-real --md out.md

The LR of image i is drawn from a generator seeded (0, i) (the same pairs for every row); LR consistency is the PSNR
between the SR output downscaled x1/4 (MATLAB bicubic) and the LR input. The held-out part of train-hr is for
choices; these test sets only report.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.data.datasets import mix_seed  # noqa: E402
from blindsr.degradations.operators import imresize  # noqa: E402
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.io.images import list_images, read_image  # noqa: E402
from blindsr.methods.dmsr.config import LossConfig  # noqa: E402
from blindsr.methods.dmsr.losses import timestep_target  # noqa: E402
from blindsr.methods.dmsr.pipeline import load_pipeline  # noqa: E402
from blindsr.metrics import psnr, ssim  # noqa: E402


def pairs(folder: Path, preset: str, limit: int | None):
    """(name, LR (1,3,h,w), HR (1,3,4h,4w)) with seeded degradations."""
    degrade = get_preset(preset)
    files = list_images(folder)[0][:limit]
    for i, f in enumerate(files):
        hr = read_image(f)[None]
        hr = hr[..., : hr.shape[-2] // 4 * 4, : hr.shape[-1] // 4 * 4]
        g = torch.Generator().manual_seed(mix_seed(0, preset, i))
        deg = degrade(hr, g)
        yield f.stem, deg.lr.clamp(0, 1), deg.hr


def scores(sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> tuple[float, float, float]:
    sr = sr.clamp(0, 1)
    back = imresize(sr, scale=0.25).clamp(0, 1)
    return (psnr(sr[0], hr[0], crop_border=4, y_channel=True), ssim(sr[0], hr[0], crop_border=4, y_channel=True),
            psnr(back[0], lr[0]))


def cell(v: list[tuple[float, float, float]]) -> str:
    """The mean PSNR / SSIM / LR consistency of a list of ``scores`` as one table cell (nan when empty)."""
    m = [sum(x[i] for x in v) / len(v) for i in range(3)] if v else [math.nan] * 3
    return f"{m[0]:.2f} / {m[1]:.4f} / {m[2]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="the DM-SR checkpoint (omit for the bicubic / baseline / BlindDiff rows alone)")
    ap.add_argument("--sd-turbo", help="SD-Turbo weights, for a checkpoint of the sd-turbo backend")
    ap.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    ap.add_argument("--presets", nargs="+", default=["resshift", "realesrgan"])
    ap.add_argument("--fixed-t", nargs="*", type=float, default=[], help="rows with t forced (Table 3)")
    ap.add_argument("--steps", nargs="*", type=int, default=[1], help="step counts (Table 4); the first is the main")
    ap.add_argument("--baseline", nargs="*", default=[], metavar="NAME=CKPT", help="other DM-SR checkpoints")
    ap.add_argument("--blinddiff", help="an embedded BlindDiff model to compare (e.g. blinddiff-s-real)")
    ap.add_argument("--t-target", default="ssim", help="ground truth of t̂ for its RMSE: ssim | l2 | lpips")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "val"))
    ap.add_argument("--limit", type=int, help="first N images of each set (smoke runs)")
    ap.add_argument("--md", help="also write the table as Markdown here")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.ckpt, sd_turbo=args.sd_turbo) if args.ckpt else None
    others = {k: load_pipeline(v, sd_turbo=args.sd_turbo) for k, v in (b.split("=", 1) for b in args.baseline)}
    bd = None
    if args.blinddiff:
        from blindsr.methods.blinddiff import load_pipeline as load_bd
        from blindsr.weights import embedded_path

        bd = load_bd(embedded_path(args.blinddiff))
    rows: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    t_err: list[float] = []

    def add(row: str, col: str, value) -> None:
        rows.setdefault(row, {}).setdefault(col, []).append(value)

    for s in args.sets:
        for preset in args.presets:
            col = f"{s} / {preset}"
            for name, lr, hr in pairs(Path(args.data) / s, preset, args.limit):
                add("bicubic", col, scores(imresize(lr, scale=4), hr, lr))
                for n in args.steps if pipe is not None else ():
                    res = pipe(lr, steps=n)
                    add(f"DM-SR, t̂, {n} step(s)", col, scores(res.sr, hr, lr))
                    if n == args.steps[0]:
                        up = imresize(lr, scale=4).clamp(0, 1)
                        t_gt = timestep_target(up, hr, LossConfig(t_target=args.t_target), pipe.prior.process.t_max)
                        t_err.append(float(res.t_hat[0] - t_gt[0]))
                for t in args.fixed_t if pipe is not None else ():
                    add(f"DM-SR, fixed t = {t:g}", col, scores(pipe(lr, steps=args.steps[0], t_hat=t).sr, hr, lr))
                for k, other in others.items():
                    add(k, col, scores(other(lr, steps=args.steps[0]).sr, hr, lr))
                if bd is not None:
                    out = bd(lr, generator=[torch.Generator().manual_seed(0)]).sr
                    add(args.blinddiff, col, scores(out, hr, lr))
                print(f"{col} {name} done", file=sys.stderr, flush=True)
    cols = [f"{s} / {p}" for s in args.sets for p in args.presets]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, by_col in rows.items():
        cells = [cell(by_col.get(c, [])) for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    rmse = math.sqrt(sum(e * e for e in t_err) / len(t_err)) if t_err else math.nan
    text = ("PSNR / SSIM (Y, border 4) / LR-consistency PSNR, x4\n\n" + "\n".join(lines)
            + f"\n\nt̂ RMSE against its {args.t_target} ground truth: {rmse:.2f} (paper, LPIPS: 7.74), "
            f"{len(t_err)} images\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
