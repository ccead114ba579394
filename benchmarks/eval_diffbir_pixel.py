"""DiffBIR's pixel backend, the paper's fidelity <-> quality claim in miniature (issue 14; DiffBIR Table 2/10):
PSNR / SSIM (Y, border 4) against HR and PSNR against the stage-1 image I_RM, for stage 1 alone and the two-stage
pipeline at several restoration-guidance scales s, on crops of Set5 / Set14 degraded x4.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_diffbir_pixel.py --scales 0 1 3 10 --md out.md
    ... --controlnet runs/diffbir_table6/final.safetensors --cleaner identity --label "no stage 1"   (Table 6)

The LR of image i is drawn from a generator seeded (0, preset, i), the sampling noise from seed 0, so every row
sees the same inputs and the same noise. Crops: the centre ``--crop`` x ``--crop`` of each HR image (a multiple of
8 after the x4 round trip), so that a row costs minutes on a CPU, not hours.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.data.datasets import mix_seed  # noqa: E402
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.io.images import list_images, read_image  # noqa: E402
from blindsr.methods.diffbir import DiffBIRConfig, DiffBIRPipeline, resolve_weights  # noqa: E402
from blindsr.metrics import psnr, ssim  # noqa: E402


def crops(folder: Path, preset: str, size: int, limit: int | None):
    degrade = get_preset(preset)
    for i, f in enumerate(list_images(folder)[0][:limit]):
        hr = read_image(f)[None]
        h, w = hr.shape[-2:]
        s = min(size, h, w) // 8 * 8
        top, left = (h - s) // 2, (w - s) // 2
        hr = hr[..., top:top + s, left:left + s]
        deg = degrade(hr, torch.Generator().manual_seed(mix_seed(0, preset, i)))
        yield f.stem, deg.lr.clamp(0, 1), deg.hr


def score(img: torch.Tensor, hr: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """PSNR and SSIM (Y, border 4) against HR, and PSNR against ``ref`` (the stage-1 image)."""
    img = img.clamp(0, 1)
    return (psnr(img[0], hr[0], crop_border=4, y_channel=True), ssim(img[0], hr[0], crop_border=4, y_channel=True),
            psnr(img[0], ref[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", nargs="+", type=float, default=[0.0, 1.0, 3.0, 10.0], help="guidance scales s")
    ap.add_argument("--controlnet", help="control branch (default: the embedded one)")
    ap.add_argument("--cleaner", help="stage-1 weights (default: the embedded SwinIR-S), or identity (Table 6)")
    ap.add_argument("--label", default="two-stage", help="row label of this control branch")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    ap.add_argument("--preset", default="realesrgan")
    ap.add_argument("--crop", type=int, default=128, help="HR crop side")
    ap.add_argument("--upscale", type=float, default=4.0,
                    help="output / LR size: 4 for x4 presets, 1 for diffbir-stage1 (its LQ is at the HR size)")
    ap.add_argument("--limit", type=int, help="first N images of each set")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "val"))
    ap.add_argument("--md", help="also write the table as Markdown here")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    identity = args.cleaner == "identity"  # Table 6: no restoration module, the condition is the bicubic LQ
    paths = resolve_weights("pixel", "sr", controlnet=args.controlnet, cleaner=None if identity else args.cleaner)
    pipe = DiffBIRPipeline.from_paths(DiffBIRConfig.from_preset("pixel", "sr", steps=args.steps, upscale=args.upscale), paths)
    if identity:
        pipe = DiffBIRPipeline(torch.nn.Identity(), pipe.sd, pipe.controlnet, pipe.config)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for s in args.sets:
        for name, lr, hr in crops(Path(args.data) / s, args.preset, args.crop, args.limit):
            stage1 = pipe(lr, stage1_only=True).image
            rows.setdefault("bicubic LQ (the condition)" if identity else "stage 1 (I_RM)", []).append(score(stage1, hr, stage1))
            for g in args.scales:
                out = pipe.with_config(guidance=replace(pipe.config.guidance, scale=g))(lr, [torch.Generator().manual_seed(0)])
                rows.setdefault(f"{args.label}, s = {g:g}", []).append(score(out.image, hr, out.stage1))
            print(f"{s} {name} done", file=sys.stderr, flush=True)
    lines = ["| pipeline | PSNR | SSIM | PSNR to I_RM |", "|---|---|---|---|"]
    for row, v in rows.items():
        m = [sum(x[i] for x in v) / len(v) for i in range(3)]
        lines.append(f"| {row} | {m[0]:.2f} | {m[1]:.4f} | {m[2]:.2f} |")
    text = (f"{' + '.join(args.sets)}, centre {args.crop}² crops, {args.preset} x{args.upscale:g}, {args.steps} DDPM steps, "
            f"{sum(len(v) for v in rows.values()) // max(len(rows), 1)} images\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
