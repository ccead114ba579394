"""DM-SR speed: per-image time and peak memory of one 128 -> 512 image, batch 1, for both backends.

    .venv/bin/python benchmarks/bench_dmsr.py --backend pixel --rounds 3
    .venv/bin/python benchmarks/bench_dmsr.py --backend sd-turbo --rounds 2 [--dtype bf16] [--device cuda]

``pixel``: the embedded Prior-S with DM-SR-S-sized E_θ / T (random weights unless --ckpt). ``sd-turbo``:
full-size SD-Turbo parts with RANDOM weights (UNet 865.9 M, VAE 83.65 M, E_θ 34.3 M, T 20.3 M), the text
embedding a random (1, 77, 1024) tensor (the text encoder is dropped after one call in real use) -- the timing of
the real model, whose weights cannot be had here. One warm-up, then ``--rounds`` timed runs (CUDA: synchronised).
Peak memory: CUDA's allocator peak, or the process's peak RSS on the CPU (each backend in its own process).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def sd_turbo_random(device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from blindsr.methods.dmsr.core import FrozenPrior
    from blindsr.methods.dmsr.nets import EncoderConfig, EstimatorConfig, TimeAwareEncoder, TimestepEstimator
    from blindsr.models.sd import load_config
    from blindsr.ops.precision import cast_keep_norms_fp32

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**load_config("unet")), AutoencoderKL(**load_config("vae"))
    if dtype != torch.float32:
        cast_keep_norms_fp32(unet, dtype)
        cast_keep_norms_fp32(vae, dtype)
    prior = FrozenPrior(unet.to(device), torch.randn(1, 77, 1024), vae=vae.to(device), scaling=0.18215,
                        multiple=8)
    return prior, TimestepEstimator(EstimatorConfig.vgg19()), TimeAwareEncoder(EncoderConfig.sd())


def pixel_random(device, prior_file=None):
    from blindsr.methods.dmsr.nets import EncoderConfig, EstimatorConfig, TimeAwareEncoder, TimestepEstimator
    from blindsr.methods.dmsr.pipeline import pixel_prior

    torch.manual_seed(0)
    return (pixel_prior(prior_file, device), TimestepEstimator(EstimatorConfig.pixel_s()),
            TimeAwareEncoder(EncoderConfig.pixel_s()))


def main() -> None:
    from blindsr.device import GIB, peak_memory, resolve_device, resolve_dtype
    from blindsr.methods.dmsr.config import InferenceConfig
    from blindsr.methods.dmsr.pipeline import DMSRPipeline, load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("pixel", "sd-turbo"), default="pixel")
    ap.add_argument("--ckpt", help="a trained DM-SR checkpoint (pixel backend) instead of random E_θ / T")
    ap.add_argument("--prior", help="pixel backend: a prior .safetensors (default: the embedded Prior-S)")
    ap.add_argument("--size", type=int, default=128, help="LR side (default 128 -> 512)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.ckpt:
        pipe = load_pipeline(args.ckpt, device)
    else:
        prior, est, enc = sd_turbo_random(device, dtype) if args.backend == "sd-turbo" else pixel_random(device, args.prior)
        pipe = DMSRPipeline(est.to(device).eval(), enc.to(device).eval(), prior, InferenceConfig(tile=None))
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0), device="cpu")
    times = []
    for r in range(args.rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = pipe(lr, steps=args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r:
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for m in (pipe.prior.unet, pipe.prior.vae, pipe.encoder, pipe.estimator) if m is not None
            for p in m.parameters())
    print(f"DM-SR {args.backend} ({n / 1e6:.1f} M parameters), {args.size}² -> {out.sr.shape[-1]}², "
          f"{args.steps} step(s), {device.type} {args.dtype}, threads {torch.get_num_threads()}: per image "
          f"median {statistics.median(times):.3f} s (min {min(times):.3f}, {len(times)} runs), peak memory "
          f"{peak_memory(device) / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
