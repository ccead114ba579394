"""DiffBIR pipeline benchmark: per-step and per-image time and peak memory, tiny and full-size models.

    .venv/bin/python benchmarks/bench_diffbir.py --config tiny                       # CPU, seconds
    .venv/bin/python benchmarks/bench_diffbir.py --config full --device cuda --dtype fp16 --size 512

Weights are random (the timing does not depend on them), so no checkpoint is needed. ``full`` on a CPU (or with
``--meta``) does not run: it prints the parameter counts and a FLOP estimate of one ControlNet + UNet call, the
VAE encoder and decoder (counted on the meta device), which is what a GPU run can be compared with. Every stage
is timed separately; "per step" is the diffusion sampling time / steps (each step = one batched cond + uncond
call when cfg != 1). Compare a GPU run with the official code at the same size, steps, cfg and precision.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

TINY_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_linear_in_transformer=True,
                 transformer_depth=1, context_dim=32)
TINY_VAE = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3,
                                           ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[]))
TINY_CLIP = dict(embed_dim=32, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
                 layer="penultimate")


def build_models(config: str):
    """(StableDiffusion, IRControlNet, cleaner) with random weights on the current default device."""
    from blindsr.models import ircontrolnet as icn
    from blindsr.models import sd
    from blindsr.models.restorers import RRDBNetConfig, build_restorer

    if config == "tiny":
        cfg = {"unet": sd.unet_config_from_ldm(TINY_UNET), "vae": sd.vae_config_from_ldm(TINY_VAE),
               "text_encoder": sd.text_config_from_openclip(TINY_CLIP)}
        cleaner = build_restorer("rrdbnet", RRDBNetConfig.tiny())
    else:
        cfg = {name: sd.load_config(name) for name in ("unet", "vae", "text_encoder")}
        cleaner = build_restorer("rrdbnet")  # BSRNet, 16.7 M
    models = sd.StableDiffusion(sd.build_unet(cfg["unet"]), sd.build_vae(cfg["vae"]),
                                sd.build_text_encoder(cfg["text_encoder"]))
    controlnet = icn.IRControlNet(icn.IRControlNetConfig.from_unet_config(cfg["unet"]))
    return models, controlnet, cleaner


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def flop_report(size: int, cfg: float) -> None:
    """Parameter counts and FLOPs of the full-size models, counted on the meta device (nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from blindsr.models.ircontrolnet import controlled_unet

    with torch.device("meta"):
        models, controlnet, cleaner = build_models("full")
        lat = size // 8
        z, t = torch.empty(1, 4, lat, lat), torch.tensor([500])
        c_txt, img = torch.empty(1, 77, 1024), torch.empty(1, 3, size, size)
        counts = {}
        with FlopCounterMode(display=False) as fc:
            controlled_unet(models.unet, z, t, c_txt, controlnet(z, t, z, c_txt))
        counts["ControlNet+UNet call"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            models.vae.encode(img)
        counts["VAE encode"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            models.vae.decode(z)
        counts["VAE decode"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            cleaner(torch.empty(1, 3, size // 4, size // 4))
        counts["BSRNet (x4 to this size)"] = fc.get_total_flops()
    for name, m in [("UNet", models.unet), ("ControlNet", controlnet), ("VAE", models.vae),
                    ("text encoder", models.text_encoder), ("BSRNet", cleaner)]:
        print(f"  params {name:<13} {n_params(m) / 1e6:9.2f} M")
    for name, f in counts.items():
        print(f"  FLOPs  {name:<28} {f / 1e12:8.3f} TFLOP at {size}x{size}")
    per_step = counts["ControlNet+UNet call"] * (2 if cfg != 1 else 1)
    print(f"  FLOPs  per sampling step (cfg {cfg:g})    {per_step / 1e12:8.3f} TFLOP")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: str, args: argparse.Namespace) -> None:
    from blindsr.device import resolve_device, resolve_dtype
    from blindsr.methods.diffbir import DiffBIRConfig, DiffBIRPipeline, Tiling
    from blindsr.methods.diffbir.guidance import GuidanceConfig

    device = resolve_device(args.device)
    size = args.size or (64 if config == "tiny" else 512)
    if config == "full" and (device.type == "cpu" or args.meta):
        print(f"[full] not run on {device.type}: parameter counts and FLOP estimate instead")
        flop_report(size, args.cfg)
        return
    torch.manual_seed(0)
    with torch.device(device):
        models, controlnet, cleaner = build_models(config)
    tiling = Tiling.off() if not args.tile else Tiling(diffusion_tile=args.tile, diffusion_overlap=args.tile // 2)
    cfg = DiffBIRConfig.from_preset("v2", "sr", steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                                    min_size=size, tiling=tiling, dtype=resolve_dtype(args.dtype, device),
                                    guidance=GuidanceConfig(scale=args.guidance_scale))
    pipe = DiffBIRPipeline(cleaner, models, controlnet, cfg, device)
    lq = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    pipe(lq, torch.Generator().manual_seed(0))  # warm-up (kernels, tokenizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        res = pipe(lq, torch.Generator().manual_seed(i))
        sync(device)
        times.append((time.perf_counter() - t0, res.timings))
    total, tm = min(times, key=lambda x: x[0])
    print(f"[{config}] {size}x{size} output, {args.sampler} {args.steps} steps, cfg {args.cfg:g}, {args.dtype}, "
          f"tile {args.tile or 'off'}, guidance {args.guidance_scale:g}, device {device}")
    print(f"  params UNet {n_params(models.unet) / 1e6:.2f} M, ControlNet {n_params(controlnet) / 1e6:.2f} M, "
          f"VAE {n_params(models.vae) / 1e6:.2f} M")
    print(f"  per image {total:.3f} s (best of {args.repeats}); stage 1 {tm['stage1']:.3f} s, encode "
          f"{tm['encode']:.3f} s, sampling {tm['sample']:.3f} s, decode {tm['decode']:.3f} s")
    print(f"  per step  {tm['sample'] / args.steps * 1000:.1f} ms ({tm['network_calls'] / args.steps:.0f} "
          f"network call(s) per step)")
    print(f"  peak memory {peak_memory(device)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "full", "both"], default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", help="UNet/ControlNet precision: fp32, fp16, bf16")
    p.add_argument("--size", type=int, help="output size in pixels (default: tiny 64, full 512)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--tile", type=int, default=0, help="diffusion tile in pixels (0 = off)")
    p.add_argument("--guidance-scale", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--meta", action="store_true", help="full: only parameter counts and FLOPs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for config in (["tiny", "full"] if args.config == "both" else [args.config]):
        run(config, args)


if __name__ == "__main__":
    main()
