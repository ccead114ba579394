"""``blindsr restore``: two-stage blind restoration with DiffBIR (stage-1 cleaner + IRControlNet).

    blindsr restore photo.png -o out/                  # offline: SwinIR-S + IRControlNet on Prior-S (embedded)
    blindsr restore photo.png -o out/ --guidance-scale 1     # pulled toward the stage-1 image (fidelity)
    blindsr restore photo.png lq_folder/ -o out/ --backend sd --version v2 --sd SD21 --controlnet v2.pth
    blindsr restore scan.png -o out/ --stage1-only --cleaner RealESRGAN_x4plus.safetensors --cleaner-kind bsrnet

Backends: pixel (the default unless --sd or --version is given: every weight ships with the package, so it runs
offline on a fresh install; BLINDSR_PRIOR, BLINDSR_SWINIR_S, BLINDSR_DIFFBIR_CONTROL_S override them) and sd (the
paper's SD 2.1 with the official ControlNets). Weights are local files only. Each can be given by its flag, an
environment variable (BLINDSR_SD21, BLINDSR_SD21_ZSNR, BLINDSR_DIFFBIR_V1_GENERAL, BLINDSR_DIFFBIR_V1_FACE, BLINDSR_DIFFBIR_V2, BLINDSR_DIFFBIR_V21,
BLINDSR_BSRNET, BLINDSR_SCUNET_PSNR, BLINDSR_SWINIR_GENERAL, BLINDSR_SWINIR_FACE, BLINDSR_SWINIR_REALESRGAN) or a
JSON file {"sd21": PATH, "diffbir_v2": PATH, "bsrnet": PATH, ...} at $BLINDSR_CONFIG or
~/.config/blindsr/weights.json. --sd also takes a local diffusers folder (unet/, vae/, text_encoder/).
Presets (--version): v1 = ddpm 50 steps, no CFG; v2 = paper setting (ddpm 50, cfg 4, negative prompt);
v2.1 = zero-SNR v-prediction, DPM-Solver++ 3M SDE 10 steps, cfg 8. Outputs are PNGs named after the inputs,
written atomically; every image gets its own generator seeded with --seed (results do not depend on batching).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUTPUT = "blindsr-restored"


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common
    from blindsr.registry import (
        DIFFBIR_BACKENDS,
        DIFFBIR_COLOR_FIXES,
        DIFFBIR_GUIDANCE_LOSSES,
        DIFFBIR_GUIDANCE_SPACES,
        DIFFBIR_SAMPLERS,
        DIFFBIR_START_POINTS,
        DIFFBIR_TASKS,
        DIFFBIR_VERSIONS,
        RESTORER_KINDS,
    )

    p = subparsers.add_parser("restore", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="OUTDIR",
                   help=f"output folder (default: ./{DEFAULT_OUTPUT})")
    p.add_argument("--task", default="sr", choices=DIFFBIR_TASKS, help="task preset (default: sr)")
    p.add_argument("--backend", choices=DIFFBIR_BACKENDS,
                   help="pixel: the embedded models (offline); sd: SD 2.1 + official ControlNet (default: sd when "
                        "--sd or --version is given, else pixel)")
    p.add_argument("--version", choices=DIFFBIR_VERSIONS, help="DiffBIR version of --backend sd (default: v2)")
    p.add_argument("--upscale", type=float, help="output / input size (default: 4 for sr, 1 otherwise)")
    w = p.add_argument_group("weights (local paths; see the environment variables above)")
    w.add_argument("--sd", metavar="PATH", help="SD 2.1-base checkpoint (.ckpt/.safetensors) or diffusers folder")
    w.add_argument("--controlnet", metavar="PATH",
                   help="DiffBIR ControlNet (sd: v1_general.pth, v2.pth, ...; pixel: default the embedded one)")
    w.add_argument("--prior", metavar="PATH", help="pixel backend: the diffusion prior (default: embedded Prior-S)")
    w.add_argument("--cleaner", metavar="PATH", help="stage-1 cleaner weights")
    w.add_argument("--cleaner-kind", choices=RESTORER_KINDS,
                   help="cleaner architecture (pixel: swinir-s; sd v2 by task: sr bsrnet, denoise scunet, face "
                        "swinir)")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=[*DIFFBIR_SAMPLERS, "spaced", "dpm++_m2"],
                   metavar="{" + ",".join(DIFFBIR_SAMPLERS) + "}",
                   help="sampler (spaced and dpm++_m2: the earlier names of ddpm and dpm++_2m)")
    s.add_argument("--steps", type=int, help="sampling steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--rescale-cfg", action="store_true", default=None, help="ramp the CFG scale with t (v2.1)")
    s.add_argument("--prompt", dest="pos_prompt", help="positive prompt")
    s.add_argument("--negative-prompt", dest="neg_prompt", help="negative prompt (the CFG's unconditional text)")
    s.add_argument("--strength", type=float, help="control strength (default 1)")
    s.add_argument("--noise-aug", type=int, help="noise the condition latent at this timestep (v2.1)")
    s.add_argument("--start-point", choices=DIFFBIR_START_POINTS, help="x_T: pure noise or the noised condition")
    s.add_argument("--color-fix", choices=DIFFBIR_COLOR_FIXES, help="colour correction (default wavelet)")
    s.add_argument("--min-size", type=int,
                   help="short side of the stage-2 input in pixels (sd: 512, official; pixel: 0 = none)")
    g = p.add_argument_group("restoration guidance (paper v2 §3.3)")
    g.add_argument("--guidance-scale", type=float,
                   help="s (x3000 internally; README uses 0.5); 0 = off (default: the preset's, 0 for sd)")
    g.add_argument("--guidance-space", choices=DIFFBIR_GUIDANCE_SPACES, default="rgb", help="default rgb (paper)")
    g.add_argument("--guidance-loss", choices=DIFFBIR_GUIDANCE_LOSSES, default="w_mse", help="default w_mse (region-adaptive)")
    g.add_argument("--guidance-start", type=int, default=1001, help="guide while stop < t+1 < start (default all)")
    g.add_argument("--guidance-stop", type=int, default=-1)
    g.add_argument("--guidance-repeat", type=int, default=1, help="gradient steps per sampling step")
    t = p.add_argument_group("memory")
    t.add_argument("--tile", type=int, metavar="PX",
                   help="diffusion tile in pixels (sd: multiple of 64, default 1024; pixel: of 8, default 256)")
    t.add_argument("--tile-overlap", type=int, metavar="PX", help="diffusion tile overlap (default tile/2)")
    t.add_argument("--cleaner-tile", type=int, metavar="PX", help="cleaner tile in input pixels (default 512)")
    t.add_argument("--vae-tile", type=int, metavar="PX", help="VAE encoder/decoder tile in pixels (default 1024)")
    t.add_argument("--no-tile", action="store_true", help="never tile (needs the most memory)")
    t.add_argument("--dtype", default="fp32", help="UNet/ControlNet precision: fp32 (default), fp16, bf16")
    t.add_argument("--offload", action="store_true", help="keep models on the CPU except while each is used")
    p.add_argument("--stage1-only", action="store_true", help="run only the cleaner (needs only --cleaner)")
    p.add_argument("--save-stage1", action="store_true", help="also write NAME_stage1.png")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per batch (same size only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--quiet", action="store_true", help="no per-image lines or progress bars")
    add_common(p)
    p.set_defaults(func=run)


def preset_name(args: argparse.Namespace) -> str:
    """The preset: ``pixel`` for the pixel backend, else --version (default v2). Without --backend: sd when --sd
    or --version names it, else pixel. Wrong pairings are refused."""
    from blindsr.errors import BlindSRError

    backend = args.backend or ("sd" if args.sd is not None or args.version is not None else "pixel")
    if backend == "pixel":
        given = [f for f, v in (("--version", args.version), ("--sd", args.sd)) if v is not None]
        if given:
            raise BlindSRError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for --backend sd")
        return "pixel"
    if args.prior is not None:
        raise BlindSRError("--prior is for --backend pixel")
    return args.version or "v2"


def build_config(args: argparse.Namespace, device):
    """The DiffBIR config from the preset of --backend/--version/--task and the flags that were given."""
    from dataclasses import replace

    from blindsr.device import resolve_dtype
    from blindsr.methods.diffbir import DiffBIRConfig, Tiling

    version = preset_name(args)
    base = DiffBIRConfig.from_preset(version, args.task)
    tiling = Tiling.from_options(args.tile, args.tile_overlap, args.cleaner_tile, args.vae_tile, args.no_tile,
                                 base=base.tiling)
    scale = base.guidance.scale if args.guidance_scale is None else args.guidance_scale
    guidance = replace(base.guidance, scale=scale, loss=args.guidance_loss, space=args.guidance_space,
                       start=args.guidance_start, stop=args.guidance_stop, repeat=args.guidance_repeat)
    return DiffBIRConfig.from_preset(
        version, args.task, upscale=args.upscale, sampler=args.sampler, steps=args.steps, cfg=args.cfg,
        rescale_cfg=args.rescale_cfg, pos_prompt=args.pos_prompt, neg_prompt=args.neg_prompt,
        strength=args.strength, noise_aug=args.noise_aug, start_point=args.start_point, color_fix=args.color_fix,
        min_size=args.min_size,
        guidance=guidance, tiling=tiling, dtype=resolve_dtype(args.dtype, device), offload=args.offload)



def run(args: argparse.Namespace) -> int:
    import torch

    from blindsr.cli.common import check_unique_outputs, collect_inputs, run_grouped
    from blindsr.device import make_generator, resolve_device
    from blindsr.errors import BlindSRError
    from blindsr.io.images import check_output_path, load_image, output_path_for
    from blindsr.methods.diffbir import DiffBIRPipeline, resolve_weights

    if args.batch_size < 1:
        raise BlindSRError("--batch-size must be at least 1")
    device = resolve_device(args.device)
    config = build_config(args, device)
    items = collect_inputs(args.inputs, args.recursive)
    if not items:
        raise BlindSRError("no images found in " + ", ".join(args.inputs))
    paths = resolve_weights(config.version, args.task, sd=args.sd, controlnet=args.controlnet, cleaner=args.cleaner,
                            cleaner_kind=args.cleaner_kind, prior=args.prior, stage1_only=args.stage1_only)
    inputs = [f for f, _ in items]
    targets = {f: output_path_for(f, root, Path(args.output), ".png") for f, root in items}
    check_unique_outputs(targets)  # before any model is loaded
    for f in inputs:  # fail before loading gigabytes of weights
        check_output_path(targets[f], overwrite=args.overwrite, inputs=inputs)
    pipe = DiffBIRPipeline.from_paths(config, paths, device)
    progress = not args.quiet and sys.stderr.isatty()

    def infer(imgs: list):
        lq = torch.stack([img.rgb for img in imgs])
        return pipe(lq, [make_generator(args.seed, "cpu") for _ in imgs], stage1_only=args.stage1_only,
                    progress=progress)

    def write(f: Path, img, res, i: int, dt: float) -> str:
        return _write(f, img, res, i, targets[f], dt, args, inputs)

    return run_grouped(inputs, args.batch_size, load_image, infer, write, quiet=args.quiet)


def _write(f: Path, img, res, i: int, target: Path, dt: float, args, inputs) -> str:
    """Write the restored image (grayscale / alpha as the input) and optionally the stage-1 image."""
    from blindsr.io.images import write_image, write_like_input

    out = res.image[i].float().cpu()
    write_like_input(target, out, img, overwrite=args.overwrite, inputs=inputs)
    if args.save_stage1:
        stem = target.with_suffix("")
        write_image(f"{stem}_stage1.png", res.stage1[i].float().clamp(0, 1).cpu(), overwrite=args.overwrite,
                    inputs=inputs)
    h, w = img.height, img.width
    return f"{f.name}: {w}x{h} -> {out.shape[-1]}x{out.shape[-2]} in {dt:.1f}s -> {target}"
