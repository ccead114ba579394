"""A sheet of unconditional DDIM samples from a pixel-space prior, seeded (sample i from seed + i), one row per
DDIM eta (same x_T), with a row of held-out training-set crops of the same size for comparison.

    python scripts/make_prior_samples.py [--weights PATH | --run runs/prior_s] [--out sheet.png]

``--weights``: a prior safetensors with its config (default: the embedded Prior-S); ``--run``: the EMA weights of
the newest checkpoint of a training run, with the run's config.yaml (to look at a run while it trains).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from blindsr.config import from_dict  # noqa: E402
from blindsr.io.visual import contact_grid  # noqa: E402
from blindsr.methods.prior.config import PriorDiffusion  # noqa: E402
from blindsr.methods.prior.model import Prior, build_unet, generators, load_prior, sample_prior  # noqa: E402
from blindsr.methods.prior.recipe import prior_unet_config, validation_crops  # noqa: E402


def from_run(run: Path) -> tuple[Prior, int]:
    """The newest checkpoint's EMA UNet of ``run`` (config from its config.yaml), and its step."""
    from blindsr.io.weights import load_into
    from blindsr.train.checkpoint import list_checkpoints, load_weights
    from blindsr.train.config import load_config

    cfg = load_config(run / "config.yaml")
    step, ckpt = list_checkpoints(run)[-1]
    unet_cfg = prior_unet_config(cfg.model)
    unet = build_unet(unet_cfg)
    load_into(unet, load_weights(ckpt / "model.ema.safetensors"))
    return Prior(unet.eval(), unet_cfg, from_dict(PriorDiffusion, cfg.diffusion, "diffusion")), step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="prior safetensors (default: the embedded Prior-S)")
    ap.add_argument("--run", help="a training run directory: its newest checkpoint's EMA weights")
    ap.add_argument("--out", default=str(REPO / "docs" / "training" / "prior_s" / "samples.png"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eta", type=float, nargs="+", default=[0.0, 1.0], help="DDIM eta, one sheet row each")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "train-hr"),
                    help="HR folder whose hold-out split gives the comparison row ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run:
        prior, step = from_run(Path(args.run))
        what = f"{args.run} step {step}"
    else:
        prior, what = load_prior(args.weights), args.weights or "embedded Prior-S"
    rows, labels, took = [], [], []
    for eta in args.eta:  # the same seeds (x_T) for every eta
        t0 = time.perf_counter()
        samples = sample_prior(prior, args.n, args.size, steps=args.steps, eta=eta,
                               generator=generators(args.seed, args.n))
        took.append(f"{time.perf_counter() - t0:.1f} s")
        rows.append(list(samples))
        labels.append([f"seed {args.seed + i} eta {eta:g}" for i in range(args.n)])
    if args.data:
        from blindsr.data.datasets import list_hr_files, split_holdout

        _, held = split_holdout(list_hr_files(args.data), 0.05, seed=0)  # prior_s.yaml's split
        rows.append(validation_crops(held, args.size, prior.unet_config.multiple, args.n))
        labels.append([f"held-out {Path(f).stem[:10]}" for f in held[: args.n]])
    contact_grid(rows, labels, args.out, height=2 * args.size, overwrite=True)
    print(f"{what}: {args.n} samples {args.size}² by DDIM {args.steps} steps (eta {args.eta}) in "
          f"{', '.join(took)} -> {args.out}")


if __name__ == "__main__":
    main()
