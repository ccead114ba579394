"""Diagnose a BlindDiff model on HELD-OUT training images (never the test sets): where does quality go?

1. x0 by noise level: PSNR of the one-step x0_hat = (x_t - sqrt(1-abar) eps_hat) / sqrt(abar) with
   x_t = q_sample(HR, t), per (respaced-500) timestep — how well the denoiser works at each noise level — and the
   kernel head's L1 error sum|k_hat - k| at the same x_t.
2. full sampling: PSNR of sampler variants (``SAMPLER:LAMBDA:STEPS:START[:NORM]``, NORM l2 or l2sq), against bicubic and, if given,
   the regression baseline, on 128x128 centre crops degraded with the 8 Gaussian8 kernels.

    python benchmarks/diagnose_blinddiff.py --images 2 --variants ddpm:0:20:1 ddim:0:20:0.4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations.operators import imresize  # noqa: E402
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.device import resolve_device  # noqa: E402
from blindsr.diffusion.parameterization import split  # noqa: E402
from blindsr.io.images import read_image  # noqa: E402
from blindsr.methods.blinddiff import load_pipeline  # noqa: E402
from blindsr.metrics import psnr  # noqa: E402
from blindsr.models.mcformer import predicted_kernels  # noqa: E402
from blindsr.train.common import split_data  # noqa: E402
from blindsr.train.config import load_config  # noqa: E402


def mean_psnr(sr: torch.Tensor, hr: torch.Tensor) -> float:
    return sum(psnr(sr[j].clamp(0, 1), hr[j], crop_border=4, y_channel=True) for j in range(len(sr))) / len(sr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="BlindDiff checkpoint (default: the embedded model)")
    ap.add_argument("--reg-ckpt", default=str(REPO / "benchmarks/weights/regression_s.safetensors"))
    ap.add_argument("--config", default=str(REPO / "configs/blinddiff_s.yaml"), help="defines the hold-out split")
    ap.add_argument("--images", type=int, default=2, help="held-out images to use")
    ap.add_argument("--variants", nargs="*", default=["ddpm:0:20:1"], help="SAMPLER:LAMBDA:STEPS:START[:NORM]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. data.root=.device-data/train-hr (same split)")
    ap.add_argument("--json", default=None, help="also write {row: mean PSNR} here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    pipe = load_pipeline(args.ckpt, device=device)
    reg = None
    if args.reg_ckpt and Path(args.reg_ckpt).is_file():
        from blindsr.io.weights import load_into, load_safetensors_metadata, load_state_dict
        from blindsr.methods.blinddiff.regression import RegressionPipeline
        from blindsr.models.mcformer import MCFormer, MCFormerConfig

        model = MCFormer(MCFormerConfig.from_official(json.loads(load_safetensors_metadata(args.reg_ckpt)["config"])["model"]))
        load_into(model, load_state_dict(args.reg_ckpt))
        reg = RegressionPipeline(model.to(device))
    _, held = split_data(load_config(args.config, args.overrides))
    g8, train = get_preset("gaussian8"), pipe.config.train_diffusion()
    rows: dict[str, list[float]] = {}
    for f in held[: args.images]:
        hr = read_image(f)
        c = min(hr.shape[-2:]) // 2
        d = g8(hr[None, :, c - 64:c + 64, c - 64:c + 64])
        d = type(d)(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(d).items()})
        rows.setdefault("bicubic", []).append(mean_psnr(imresize(d.lr, scale=4), d.hr))
        if reg is not None:
            rows.setdefault("regression baseline", []).append(mean_psnr(reg(d.lr).sr, d.hr))
        g = torch.Generator().manual_seed(0)
        for i in (10, 50, 100, 200, 300, 400, 499):  # 1. x0 by noise level (respaced-500 index)
            t = torch.full((len(d.hr),), i, device=device)
            x_t = train.q_sample(d.hr, t, torch.randn(d.hr.shape, generator=g).to(device))
            with torch.no_grad():
                out, k_out = pipe.model(x_t, train.original_t(t), d.lr)
            k_hat = predicted_kernels(pipe.model, k_out)
            k_l1 = float((k_hat - d.kernel).abs().sum((-2, -1)).mean())
            rows.setdefault(f"kernel L1 at t={i}/500", []).append(k_l1)
            _, x0 = split(out[:, :3], pipe.config.prediction, x_t, train.abar(t, x_t))
            rows.setdefault(f"one-step x0 at t={i}/500", []).append(mean_psnr(x0, d.hr))
        for v in args.variants:  # 2. full sampling
            sampler, lam, steps, start, norm = (v.split(":") + ["l2"])[:5]
            gens = [torch.Generator().manual_seed(j) for j in range(len(d.hr))]
            sr = pipe(d.lr, steps=int(steps), lam=float(lam), sampler=sampler, start=float(start), norm=norm,
                      generator=gens).sr
            rows.setdefault(f"{sampler}, λ={lam} {norm}, {steps} steps, start={start}", []).append(mean_psnr(sr, d.hr))
        print(f"{f.name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    print(f"\nmean PSNR (Y, border 4) over {len(rows['bicubic'])} held-out 128x128 crops x 8 Gaussian8 kernels")
    for k, v in rows.items():
        digits = 3 if k.startswith("kernel") else 2
        print(f"  {k:40s} {sum(v) / len(v):6.{digits}f}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: sum(v) / len(v) for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
