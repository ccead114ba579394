"""Time and peak memory of BlindDiff sampling (Algorithm 2) per image, for a few LR sizes.

    python benchmarks/bench_blinddiff_sampling.py --sizes 64 128 --steps 20 --device cpu --config tiny

``--sizes`` are LR sides (the output is ``scale`` times larger). Weights are random (timing only) unless
``--ckpt`` is given. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the
process's peak RSS (``ru_maxrss``, a high-water mark, so sizes run in increasing order; tracemalloc cannot
see torch's allocator).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="LR sides (default: 64 128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--config", choices=["tiny", "small", "full"], default="tiny")
    p.add_argument("--ckpt", help="use these weights (config from the checkpoint) instead of random ones")
    p.add_argument("--lam", type=float, default=1.0, help="guidance step; 0 = no autograd (faster)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tile", type=int, default=None, help="HR tile size (default: whole image)")
    p.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per size (the mean is printed)")
    args = p.parse_args(argv)

    import torch

    from blindsr.device import make_generator, resolve_device, resolve_dtype
    from blindsr.methods.blinddiff import BlindDiffPipeline, load_pipeline
    from blindsr.models.mcformer import MCFormer, MCFormerConfig, count_parameters

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.ckpt:
        pipe = load_pipeline(args.ckpt, device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = MCFormer(getattr(MCFormerConfig, args.config)()).to(device=device, dtype=dtype)
        pipe = BlindDiffPipeline(model)
    s = pipe.scale
    params = count_parameters(pipe.model) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"# BlindDiff sampling: config={args.config if not args.ckpt else args.ckpt} ({params:.2f} M params), "
          f"steps={args.steps}, lam={args.lam}, batch={args.batch}, tile={args.tile}, dtype={args.dtype}, "
          f"device={name}, torch {torch.__version__}")
    print(f"{'LR':>9} {'SR':>11} {'s/image':>9} {'ms/step':>9} {'peak MiB':>10}  memory")

    def run(size: int, steps: int):
        lr = torch.rand(args.batch, 3, size, size, generator=make_generator(0)).to(device)
        gens = [make_generator(i) for i in range(args.batch)]
        return pipe(lr, steps=steps, lam=args.lam, generator=gens, tile=args.tile)

    run(min(args.sizes), 2)  # warm-up (kernels, allocator)
    for size in sorted(args.sizes):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = peak_rss_mib()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run(size, args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        per_image = sum(times) / len(times) / args.batch
        if device.type == "cuda":
            peak, how = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
        else:
            peak, how = peak_rss_mib() - rss0, "peak-RSS growth (ru_maxrss)"
        print(f"{size:>4}x{size:<4} {size * s:>5}x{size * s:<5} {per_image:>9.2f} "
              f"{1000 * per_image * args.batch / args.steps:>9.1f} {peak:>10.0f}  {how}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
