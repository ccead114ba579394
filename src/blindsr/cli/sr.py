"""``blindsr sr``: blind super-resolution with BlindDiff (the embedded default model needs no flags).

    blindsr sr photo.png lr_folder/ -o out/ --steps 100 --save-kernel

Outputs are PNG files named after the inputs (sub-folders of a folder input are kept), written atomically,
never over an input and never over an existing file without ``--overwrite``. Each image gets its own
generator seeded with ``--seed``, so its result does not depend on the other inputs or on ``--batch-size``.
Alpha channels are upscaled separately (bicubic); grayscale inputs are written back as grayscale.
Under ``accelerate launch`` (or ``torchrun``) every process takes every N-th input (one GPU each): each image
is done exactly once and comes out as in a single-process run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = "blindsr-output"


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common
    from blindsr.registry import (
        BLINDDIFF_DOWNS,
        BLINDDIFF_KERNEL_ESTIMATES,
        BLINDDIFF_KERNEL_MODES,
        BLINDDIFF_NORMS,
        BLINDDIFF_SAMPLERS,
        names,
    )

    p = subparsers.add_parser("sr", help=help_, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="OUTDIR",
                   help=f"output folder (default: ./{DEFAULT_OUTPUT})")
    p.add_argument("--method", choices=names("sr"),
                   help=f"SR method (default: the one that wrote --ckpt's safetensors, else {names('sr')[0]})")
    from blindsr.weights import DEFAULT_MODEL, EMBEDDED

    p.add_argument("--model", action=_ModelAction, metavar="NAME",
                   help="embedded model: " + "; ".join(f"{k}: {v[1]}" for k, v in EMBEDDED.items())
                   + f" (default {DEFAULT_MODEL}); 'list' prints them")
    p.add_argument("--ckpt", metavar="FILE", help="checkpoint (.safetensors/.pth) with its config in the metadata "
                   "or a sidecar .json, instead of an embedded model")
    p.add_argument("--steps", type=int, help="sampling steps (respaced; default: the model's: 3 for the embedded "
                   "models, 500 for official BlindDiff checkpoints)")
    p.add_argument("--lambda", dest="lam", type=float,
                   help="kernel-aware gradient step (default: the model's, 1; 0 = off, faster); a model with "
                        "lam_ref_steps N applies LAMBDA*N/steps per step")
    p.add_argument("--norm", choices=BLINDDIFF_NORMS, help="guidance norm: l2 (official) or l2sq (paper)")
    p.add_argument("--down", choices=BLINDDIFF_DOWNS, help="downsampling in the guidance operator")
    p.add_argument("--x0-reg", type=float, help="weight of the official extra ||x0|| term (default 0.1; 0 = paper)")
    p.add_argument("--kernel-mode", choices=BLINDDIFF_KERNEL_MODES,
                   help="guidance kernel: estimated by the model, or identity ('bicubic' ablation)")
    p.add_argument("--kernel-estimate", choices=BLINDDIFF_KERNEL_ESTIMATES,
                   help="the kernel --save-kernel writes: fit (default: the Gaussian that best re-degrades the "
                        "result into the input) or model (MCFormer's last-step estimate, as in the paper)")
    p.add_argument("--sampler", choices=BLINDDIFF_SAMPLERS,
                   help="ddpm: ancestral with learned variance (official, default); ddim: deterministic (eta 0)")
    p.add_argument("--start", type=float, metavar="S",
                   help="1 (default) = from pure noise (Algorithm 2); S < 1 = from bicubic-upsampled input noised to "
                   "S*T, running only those steps (SDEdit/StableSR-style)")
    p.add_argument("--tile", type=int, metavar="T",
                   help="HR tile size of the denoiser (default: chosen from --max-memory; whole image if it fits)")
    p.add_argument("--max-memory", default="auto", metavar="GIB",
                   help="memory budget (per image of a batch) that picks the tile size: GiB, 'auto' (default: "
                        "min(3 GiB, 75%% of the free RAM); on CUDA 75%% of the free VRAM) or 'none' (never tile "
                        "unless --tile); on the CPU it includes what the process holds after loading the model")
    p.add_argument("--tile-overlap", type=int, metavar="P", help="HR overlap between tiles (default 32)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per batch (same size only)")
    p.add_argument("--compile", action="store_true",
                   help="BlindDiff: run the transformer blocks through torch.compile (needs a C++ compiler on the "
                        "CPU). Each new input or tile shape first compiles (10-40 s with inductor's disk cache, "
                        "about a minute or more without); then sampling is about 1.1-1.25x faster (measured on 2 "
                        "CPU cores): for long runs, folders of same-size photos, or tiled photos")
    p.add_argument("--save-kernel", action="store_true", help="also write NAME_kernel.png and NAME_kernel.npy")
    p.add_argument("--save-trajectory", action="store_true",
                   help="also write NAME_trajectory.png (x0 estimates) and NAME_kernels.npy (kernel per step)")
    m = p.add_argument_group("DM-SR (--method dmsr)")
    m.add_argument("--sd-turbo", metavar="PATH", help="SD-Turbo weights (local diffusers folder or .safetensors) "
                   "for a DM-SR encoder trained on the sd-turbo backend")
    m.add_argument("--encoder", metavar="FILE", help="DM-SR checkpoint (E_θ + T); the same as --ckpt")
    m.add_argument("--t-hat", type=float, metavar="T", help="force this timestep for every image (default: "
                   "estimated per image)")
    m.add_argument("--prompt", help="the fixed prompt of the sd-turbo backend (default: the paper's)")
    m.add_argument("--color-fix", choices=("wavelet", "adain", "none"),
                   help="colour correction (DM-SR and StableSR; default: DM-SR none, StableSR adain)")
    s = p.add_argument_group("StableSR (--method stablesr; --ckpt: an official stage-1 .ckpt or a `blindsr train "
                             "stablesr` final.safetensors; --steps default 200; --tile: pixel tiles, default 1280)")
    s.add_argument("--cfw", metavar="FILE", help="official CFW decoder checkpoint (default: the plain SD decoder)")
    s.add_argument("--dec-w", type=float, metavar="W", help="CFW fusion weight (default 0.5; 0 = the SD decoder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--quiet", action="store_true", help="no per-image lines or progress bars")
    add_common(p)
    p.set_defaults(func=run)



class _ModelAction(argparse.Action):
    """``--model NAME`` (checked against the embedded models); ``--model list`` prints them and exits 0."""

    def __call__(self, parser, namespace, value, option_string=None):
        from blindsr.weights import DEFAULT_MODEL, EMBEDDED, embedded_path

        if value == "list":
            for name, (_file, what) in EMBEDDED.items():
                mark = " (default)" if name == DEFAULT_MODEL else ""
                state = "" if embedded_path(name).is_file() else " [not installed]"
                print(f"{name}{mark}: {what}{state}")
            parser.exit(0)
        if value not in EMBEDDED:
            parser.error(f"--model: unknown model {value!r}; choose one of: {', '.join(EMBEDDED)} (or 'list')")
        setattr(namespace, self.dest, value)


def run(args: argparse.Namespace) -> int:
    import torch

    from blindsr.cli.common import check_unique_outputs, collect_inputs, process_shard, run_grouped
    from blindsr.device import freed_memory_kept, make_generator, resolve_device, sampling_budget
    from blindsr.errors import BlindSRError
    from blindsr.io.images import check_output_path, output_path_for

    if args.batch_size < 1:
        raise BlindSRError("--batch-size must be at least 1")
    if args.method is None:
        args.method = _method_of(args.ckpt or args.encoder)
    if args.steps is not None and args.steps < 1:
        raise BlindSRError("--steps must be at least 1")
    items = collect_inputs(args.inputs, args.recursive)
    if not items:
        raise BlindSRError("no images found in " + ", ".join(args.inputs))
    out_dir = Path(args.output)
    rank, world, local_rank = process_shard()
    inputs = [f for f, _ in items]
    targets = {f: output_path_for(f, root, out_dir, ".png") for f, root in items}
    check_unique_outputs(targets)  # before any model is loaded
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda" and device.index is None:  # one GPU per process
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    progress = not args.quiet and sys.stderr.isatty()
    if args.method == "dmsr":
        pipe, opts = _dmsr(args, device)
        budget = None
    elif args.method == "srnet":
        pipe, opts = _srnet(args, device)
        budget = None
    elif args.method == "stablesr":
        pipe, opts = _stablesr(args, device)
        budget = None
    else:
        pipe, opts = _blinddiff(args, device)
        budget = sampling_budget(args.max_memory, device)  # once, after loading the model
    opts["progress"] = progress

    def prepare(f: Path):
        from blindsr.io.images import load_image

        check_output_path(targets[f], overwrite=args.overwrite, inputs=inputs)
        return load_image(f)

    def infer(imgs: list):
        lr = torch.stack([img.rgb for img in imgs]).to(device)
        room = None if budget is None else max(budget, 0) * len(imgs)  # --max-memory is per image of a batch
        memory = {"max_memory": room} if args.method == "blinddiff" else {}
        return pipe(lr, generator=[make_generator(args.seed, "cpu") for _ in imgs], **memory, **opts)

    def write(f: Path, img, res, i: int, dt: float) -> str:
        return _write(f, img, res, i, targets[f], pipe.scale, dt, args, inputs, device)

    mine = inputs[rank::world]  # the checks above saw every input: all processes refuse the same runs
    t0 = time.perf_counter()
    with freed_memory_kept():  # CPU: reuse freed activations instead of page-faulting them in at every step
        rc = run_grouped(mine, args.batch_size, prepare, infer, write, quiet=args.quiet)
    who = f" (process {rank + 1} of {world})" if world > 1 else ""
    if not args.quiet:
        from blindsr.device import GIB, peak_memory

        print(f"blindsr: {len(mine)} input(s) in {time.perf_counter() - t0:.1f}s, peak memory "
              f"{peak_memory(device) / GIB:.2f} GiB{who}", file=sys.stderr)
    if world > 1 and rc:  # a non-zero exit would make the launcher stop the other processes mid-run
        print(f"blindsr: some inputs failed{who} (listed above); exiting 0 so that the other processes finish",
              file=sys.stderr)
        return 0
    return rc


def _blinddiff(args: argparse.Namespace, device) -> tuple:
    """The BlindDiff pipeline of ``--model`` / ``--ckpt`` and its per-call options."""
    from blindsr.errors import BlindSRError
    from blindsr.registry import resolve

    ckpt = args.ckpt
    _refuse_stablesr_options(args, "BlindDiff")
    for flag in ("sd_turbo", "encoder", "t_hat", "prompt", "color_fix"):
        if getattr(args, flag) is not None:
            raise BlindSRError(f"--{flag.replace('_', '-')} is a DM-SR option (--method dmsr)")
    if args.model:
        from blindsr.weights import embedded_path

        if args.ckpt:
            raise BlindSRError("give --model or --ckpt, not both")
        ckpt = embedded_path(args.model)  # a missing file: load_pipeline's one-line "checkpoint not found"
    pipe = resolve("sr", args.method)(ckpt, device=device)
    if args.compile:
        from blindsr.device import check_compiler
        from blindsr.models.mcformer import unwrap_model

        check_compiler(device)
        unwrap_model(pipe.model).compiled_blocks = True
    # the config's own choices are validated by BlindDiffConfig (dataclasses.replace in the pipeline)
    return pipe, dict(steps=args.steps, lam=args.lam, norm=args.norm, down=args.down, x0_reg=args.x0_reg,
                      kernel_mode=args.kernel_mode, kernel_estimate=args.kernel_estimate, sampler=args.sampler,
                      start=args.start, tile=args.tile,
                      tile_overlap=args.tile_overlap, return_trajectory=args.save_trajectory)


def _method_of(ckpt: str | None) -> str:
    """The method a blindsr safetensors checkpoint names in its metadata (``srnet``, ``dmsr``); else blinddiff
    (official ``.pth`` files and the embedded models)."""
    from blindsr.registry import names

    if ckpt and str(ckpt).endswith(".safetensors") and Path(ckpt).is_file():
        from blindsr.io.weights import load_safetensors_metadata

        method = load_safetensors_metadata(ckpt).get("method")
        if method in names("sr"):
            return method
    return "blinddiff"


def _refuse_blinddiff_options(args: argparse.Namespace, method: str) -> None:
    from blindsr.errors import BlindSRError

    blinddiff_only = {"model": args.model, "lambda": args.lam, "norm": args.norm, "down": args.down,
                      "x0-reg": args.x0_reg, "kernel-mode": args.kernel_mode,
                      "kernel-estimate": args.kernel_estimate, "sampler": args.sampler,
                      "start": args.start, "save-kernel": args.save_kernel or None,
                      "save-trajectory": args.save_trajectory or None, "compile": args.compile or None}
    given = [f"--{k}" for k, v in blinddiff_only.items() if v is not None]
    if given:
        raise BlindSRError(f"{', '.join(given)}: BlindDiff option(s), not {method}'s")


def _refuse_stablesr_options(args: argparse.Namespace, method: str) -> None:
    from blindsr.errors import BlindSRError

    given = [f"--{k}" for k, v in {"cfw": args.cfw, "dec-w": args.dec_w}.items() if v is not None]
    if given:
        raise BlindSRError(f"{', '.join(given)}: StableSR option(s) (--method stablesr), not {method}'s")


def _stablesr(args: argparse.Namespace, device) -> tuple:
    """StableSR from ``--ckpt`` (+ ``--cfw``); ``--tile`` / ``--tile-overlap``: its pixel tiles (vqgantile)."""
    from blindsr.errors import BlindSRError
    from blindsr.registry import resolve

    _refuse_blinddiff_options(args, "StableSR")
    for flag in ("sd_turbo", "encoder", "t_hat", "prompt"):
        if getattr(args, flag) is not None:
            raise BlindSRError(f"--{flag.replace('_', '-')}: not an option of --method stablesr")
    pipe = resolve("sr", "stablesr")(args.ckpt, device=device, cfw=args.cfw)
    return pipe, dict(steps=args.steps, color_fix=args.color_fix, dec_w=args.dec_w, pixel_tile=args.tile,
                      pixel_overlap=args.tile_overlap)


def _srnet(args: argparse.Namespace, device) -> tuple:
    """A trained SR network (``blindsr train srnet``) from ``--ckpt``; ``--tile`` in output pixels."""
    from blindsr.errors import BlindSRError
    from blindsr.registry import resolve

    _refuse_blinddiff_options(args, "srnet")
    _refuse_stablesr_options(args, "srnet")
    for flag in ("sd_turbo", "encoder", "t_hat", "prompt", "color_fix", "steps"):
        if getattr(args, flag) is not None:
            raise BlindSRError(f"--{flag.replace('_', '-')}: not an option of --method srnet")
    pipe = resolve("sr", "srnet")(args.ckpt, device=device)
    s = pipe.scale
    return pipe, dict(tile=None if args.tile is None else max(args.tile // s, 8),
                      tile_overlap=None if args.tile_overlap is None else args.tile_overlap // s)


def _dmsr(args: argparse.Namespace, device) -> tuple:
    """The DM-SR pipeline of ``--encoder`` / ``--ckpt`` (and ``--sd-turbo``) and its per-call options."""
    from blindsr.errors import BlindSRError
    from blindsr.registry import resolve

    _refuse_blinddiff_options(args, "DM-SR")
    _refuse_stablesr_options(args, "DM-SR")
    if args.ckpt and args.encoder:
        raise BlindSRError("give --encoder or --ckpt, not both")
    pipe = resolve("sr", "dmsr")(args.encoder or args.ckpt, device=device, sd_turbo=args.sd_turbo,
                                 prompt=args.prompt)
    return pipe, dict(steps=args.steps, t_hat=args.t_hat, color_fix=args.color_fix, tile=args.tile,
                      tile_overlap=args.tile_overlap)


def _write(f: Path, img, res, i: int, target: Path, scale: int, dt: float, args, inputs, device) -> str:
    """Write the SR image (gray / alpha as the input) and the optional kernel / trajectory files."""
    from blindsr.io.images import write_like_input

    write_like_input(target, res.sr[i].float().cpu(), img, overwrite=args.overwrite, inputs=inputs)
    extra = []
    stem = target.with_suffix("")
    if args.save_kernel:
        from blindsr.io.visual import save_kernel

        save_kernel(res.kernel[i].cpu(), f"{stem}_kernel.png", overwrite=args.overwrite)
        extra.append("kernel")
    if args.save_trajectory and res.x0_traj is not None:
        _write_trajectory(stem, res, i, args.overwrite)
        extra.append("trajectory")
    h, w = img.height, img.width
    more = f" (+{', '.join(extra)})" if extra else ""
    from blindsr.device import GIB, peak_memory

    t_hat = getattr(res, "t_hat", None)  # DM-SR
    t_hat = f", t̂ {t_hat[i].item():.1f}" if t_hat is not None else ""
    return (f"{f.name}: {w}x{h} -> {w * scale}x{h * scale} in {dt:.1f}s{t_hat} (peak memory so far "
            f"{peak_memory(device) / GIB:.2f} GiB) -> {target}{more}")


def _write_trajectory(stem: Path, res, i: int, overwrite: bool) -> None:
    import numpy as np

    from blindsr.io.images import atomic_write
    from blindsr.io.visual import contact_sheet

    n = res.kernels_traj.shape[0]
    labels = [f"step {s + 1}/{n}" for s in res.traj_steps]
    contact_sheet([x[i] for x in res.x0_traj], labels, f"{stem}_trajectory.png", overwrite=overwrite)
    with atomic_write(f"{stem}_kernels.npy", "wb", overwrite=overwrite) as fh:
        np.save(fh, res.kernels_traj[:, i].numpy().astype(np.float32))
