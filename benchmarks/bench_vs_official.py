"""blindsr's BlindDiff sampling vs the OFFICIAL BlindDiff code (lifengcs/BlindDiff), side by side.

The official code is imported at run time from a checkout (never copied into this repository):

    git clone https://github.com/lifengcs/BlindDiff /tmp/BlindDiff
    .venv/bin/python benchmarks/bench_vs_official.py --official /tmp/BlindDiff --steps 3 --threads 1

Same weights (``--weights``, eps prediction: the official GaussianDiffusion has no v), same sampler: official
``create_diffusion(str(steps))`` + ``p_sample_loop(clip_denoised=False)`` as in its ``DiffusionModel.test``
(IDDPM respacing, learned-range variance, ``x_{t-1} -= grad_{x_t}(||y - (k ⊗ x0)↓4|| + 0.1 ||x0||)``) vs
blindsr ``load_pipeline(w)(lr, sampler="ddpm", lam=1, lam_ref_steps=0, norm="l2", x0_reg=0.1, down="bicubic")``.
Same noise: generators seeded alike; the official module's ``th.randn_like`` draws from its generator (x_T
first, then one draw per step, blindsr's order). Each (implementation, size, round) runs in its own subprocess
(own peak RSS; an ``RLIMIT_AS`` cap makes OOM a result), interleaved; timed: sampling only, after loading and a
warm-up at LR 16² ("blindsr-compiled", ``blindsr sr --compile``: at the timed size, and that first run,
compile included, is printed beside it; the timed run is what the next same-size photo or tile sees).
The blindsr children make the allocator setting ``blindsr sr`` makes for its sampling (``device.keep_freed_memory``;
``BLINDSR_MALLOC=default`` in the environment turns it off) and report the network's kernel
(``kernel_estimate="model"``, as the official code; the shipped Gaussian fit is extra work after sampling);
"official-keep" is the official code with that same allocator setting, for a fair view of what it alone buys.
"blindsr-tiled" is ``blindsr sr``'s automatic tiling (3 GiB minus the RSS after loading), run where untiled blindsr does not fit the cap (``--tiled-always``: wherever that budget tiles). Max abs diff:
clamped outputs, over the pixels finite in both. ``--check-steps``: an extra, untimed equality check (a
few-step sampler may diverge). The official ``__init__`` files (cv2, data, models, ...) are not run:
``basicsr``, ``basicsr.archs``, ``basicsr.utils`` are stand-in packages whose ``__path__`` is the checkout,
so only ``archs/blinddiff_arch.py``, ``diffusion/*`` and ``utils/util.py`` execute.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "benchmarks/weights/blinddiff_s_stage1_eps.safetensors"
DEFAULT_IMAGE = ROOT.parent / "shared/data/real-lr/RealSRSet/tiger.png"
IMPLS = ("official", "official-keep", "blindsr", "blindsr-compiled", "blindsr-tiled")


# ------------------------------------------------------------------------------------------ the official code
def import_official(checkout: Path):
    """(blinddiff_arch, gaussian_diffusion, create_diffusion) from an official checkout, without its heavy
    package ``__init__`` files: stand-in packages whose ``__path__`` is the checkout's folder."""
    root = checkout / "basicsr"
    if not (root / "diffusion/gaussian_diffusion.py").is_file():
        raise SystemExit(f"{checkout} is not a BlindDiff checkout (no basicsr/diffusion/gaussian_diffusion.py)")
    for name, folder in (("basicsr", root), ("basicsr.archs", root / "archs"), ("basicsr.utils", root / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg

    for name in ("get_root_logger", "imwrite", "tensor2img", "SRMDPreprocessing", "stable_batch_kernel"):
        setattr(sys.modules["basicsr.utils"], name, None)  # gaussian_diffusion imports them, never calls them
    registry = types.ModuleType("basicsr.utils.registry")
    registry.ARCH_REGISTRY = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    sys.modules["basicsr.utils.registry"] = registry
    for dep, stand_in in (("cv2", types.ModuleType("cv2")), ("einops", types.SimpleNamespace(rearrange=_rearrange))):
        try:  # cv2: imported by util.py / gaussian_diffusion.py, unused by sampling; einops: the arch's layouts
            importlib.import_module(dep)
        except ImportError:
            print(f"{dep} is not installed: using a stand-in", file=sys.stderr)
            sys.modules[dep] = stand_in
    arch = importlib.import_module("basicsr.archs.blinddiff_arch")
    diffusion = importlib.import_module("basicsr.diffusion")  # the real package: create_diffusion
    return arch, importlib.import_module("basicsr.diffusion.gaussian_diffusion"), diffusion.create_diffusion


def _rearrange(x, pattern: str, **n):  # the four einops layouts blinddiff_arch.py uses, einops' op sequence
    b = x.shape[0]
    if pattern == "b c h w -> b (h w) c":
        return x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1])
    if pattern == "b (h w) c -> b c h w":
        return x.reshape(b, n["h"], n["w"], -1).permute(0, 3, 1, 2)
    if pattern == "b (head c) h w -> b head c (h w)":
        return x.reshape(b, n["head"], -1, x.shape[2] * x.shape[3])
    if pattern == "b head c (h w) -> b (head c) h w":
        return x.reshape(b, -1, n["h"], n["w"])
    raise NotImplementedError(pattern)


def official_sampler(args, model_cfg: dict):
    import torch
    from safetensors.torch import load_file

    if model_cfg.get("variant", "official") != "official" or not model_cfg.get("modulation", True):
        raise SystemExit("the official BlindDiff arch is variant 'official' with modulation")
    arch, gd, create_diffusion = import_official(Path(args.official))
    same = ("out_channels", "dim", "num_blocks", "num_refinement_blocks", "heads", "ffn_expansion_factor", "bias",
            "kernel_size", "scale")  # official argument names = blindsr's config keys, but for these two:
    net = arch.BlindDiff(inp_channels=model_cfg["in_channels"], LayerNorm_type=model_cfg["layernorm_type"],
                         **{k: model_cfg[k] for k in same})
    net.load_state_dict(load_file(str(args.weights)), strict=True)
    net = net.to(args.device).eval()
    diffusion = create_diffusion(str(args.steps))  # what DiffusionModel builds from num_sampling_steps
    s = model_cfg["scale"]

    def run(lr, gen):
        x_T = torch.randn((1, 3, lr.shape[-2] * s, lr.shape[-1] * s), generator=gen).to(args.device)
        gd.th = types.SimpleNamespace(**{**vars(torch), "randn_like": lambda x: torch.randn(  # torch, except the
            x.shape, generator=gen, dtype=x.dtype).to(x.device)})  # noise: drawn as blindsr's randn_tensor does
        out = diffusion.p_sample_loop(net, x_T.shape, x_T, clip_denoised=False, model_kwargs={"cond": lr},
                                      device=torch.device(args.device))
        run.raw_absmax = float(out.detach().abs().max())  # unclamped: flags a diverged sampler
        return out.detach().clamp(0, 1), None
    return run


def blindsr_sampler(args, tiled: bool, compiled: bool = False):
    from blindsr.device import resident_memory
    from blindsr.methods.blinddiff import load_pipeline

    pipe = load_pipeline(args.weights, device=args.device)
    pipe.model.compiled_blocks = compiled  # `blindsr sr --compile`
    if pipe.config.prediction != "eps":
        raise SystemExit(f"{args.weights} predicts {pipe.config.prediction!r}; the official code needs eps")
    opts = dict(steps=args.steps, sampler="ddpm", lam=1.0, lam_ref_steps=0, norm="l2", x0_reg=0.1,
                down="bicubic", kernel_mode="estimated", start=1.0,
                kernel_estimate="model")  # the network's kernel, as the official code; the fit is extra work
    budget = int(args.tile_budget_gb * 2**30) - (resident_memory() if args.device == "cpu" else 0)

    def tile_for(lr):  # what the pipeline's max_memory picks (None: the budget fits untiled)
        s = pipe.scale
        return pipe.auto_tile(1, lr.shape[-2] * s, lr.shape[-1] * s, budget, overlap=pipe.config.tile_overlap)

    def run(lr, gen):
        if not tiled:
            return pipe(lr, generator=gen, **opts).sr, None
        return pipe(lr, generator=gen, max_memory=budget, **opts).sr, tile_for(lr)
    run.tile_for = tile_for
    return run


# --------------------------------------------------------------------------------------------------- a child
def make_lr(path: Path, size: int):
    """Centre crop size x size of the photo in [0, 1], (1, 3, size, size); mirrored if the photo is smaller;
    a deterministic synthetic image if it is missing."""
    import numpy as np
    import torch
    from PIL import Image

    if path.is_file():
        a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    else:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        a = np.stack([0.5 + 0.5 * np.sin(12 * x + 3 * y), 0.5 + 0.5 * np.cos(36 * x * y), (x + y) / 2], -1)
    ph, pw = max(0, size - a.shape[0]), max(0, size - a.shape[1])
    a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    a = a[top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].contiguous()


def child(args) -> None:
    impl, size = args.child.split(":")[0], int(args.child.split(":")[1])
    if args.device == "cpu":
        cap = int(args.mem_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from blindsr.device import keep_freed_memory

    if impl != "official":  # what `blindsr sr` does around its sampling; "official-keep": the official code with it
        keep_freed_memory()
    import torch

    from blindsr.device import resident_memory
    from blindsr.methods.blinddiff import read_config

    torch.set_num_threads(args.threads)
    cfg = read_config(Path(args.weights))
    run = (official_sampler(args, cfg["model"]) if impl.startswith("official")
           else blindsr_sampler(args, impl == "blindsr-tiled", impl == "blindsr-compiled"))
    cuda = args.device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else resident_memory()
    result = {"impl": impl, "size": size}
    if impl == "blindsr-tiled" and run.tile_for(make_lr(args.image, size)) is None:
        print("RESULT " + json.dumps({**result, "status": "not tiled", "tile": None}), flush=True)
        return
    try:
        # warm-up; compiled: at the timed size, so that it compiles (or loads inductor's disk cache) there
        t0 = time.perf_counter()
        warm = size if impl == "blindsr-compiled" else 16
        run(make_lr(args.image, warm).to(args.device), torch.Generator().manual_seed(args.seed))
        result["first_seconds"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        lr = make_lr(args.image, size).to(args.device)
        t0 = time.perf_counter()
        sr, tile = run(lr, torch.Generator().manual_seed(args.seed))
        if cuda:
            torch.cuda.synchronize()
        result.update(status="ok", seconds=time.perf_counter() - t0, tile=tile, out_pixels=sr.shape[-2] * sr.shape[-1],
                      raw_absmax=getattr(run, "raw_absmax", None))
        import numpy as np

        np.save(args.out, sr[0].float().cpu().numpy())
    except (MemoryError, RuntimeError) as e:  # RLIMIT_AS: the allocator's "can't allocate memory"
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        result.update(status="OOM")
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(base_bytes=base, peak_bytes=peak)
    print("RESULT " + json.dumps(result), flush=True)


# -------------------------------------------------------------------------------------------------- parent
def run_child(args, impl: str, size: int, out: Path, steps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{impl}:{size}", "--out", str(out), "--steps", str(steps or args.steps)]
    for k in ("official", "weights", "image", "threads", "device", "mem_cap_gb", "seed", "tile_budget_gb"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout>{args.timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][7:])
    err = p.stderr.strip().splitlines()
    oom = p.returncode < 0 or any("memory" in ln.lower() for ln in err[-5:])
    return {"status": "OOM" if oom else f"failed (rc {p.returncode}): {err[-1] if err else ''}"}


def fmt_table(args, results: dict, diffs: dict) -> str:
    import statistics

    rows = ["LR → output | implementation | s/image mean (min) | µs per output px | peak RSS GiB | "
            "peak − loaded, B per output px | official / this | max abs diff vs official"]
    rows.append("|".join(["---"] * 8))
    for size in args.sizes:
        means = {}
        for impl in args.impls:
            runs = results.get((impl, size))
            if not runs:
                continue
            ok = [r for r in runs if r.get("status") == "ok"]
            label = impl if impl != "blindsr-tiled" or not ok else f"blindsr tiled ({ok[0]['tile']}² HR tiles)"
            if impl == "blindsr-compiled" and ok:  # round 0 compiles from scratch unless the disk cache has it
                label += " (first run with compile: " + " / ".join(f"{r['first_seconds']:.0f}" for r in ok) + " s)"
            head = f"{size}² → {4 * size}² | {label}"
            if not ok:
                rows.append(f"{head} | {runs[0]['status']} | – | – | – | – | –")
                continue
            secs = [r["seconds"] for r in ok]
            means[impl] = statistics.mean(secs)
            px = ok[0]["out_pixels"]
            peak, grow = max(r["peak_bytes"] for r in ok), max(r["peak_bytes"] - r["base_bytes"] for r in ok)
            ratio = f"{means['official'] / means[impl]:.2f}×" if "official" in means and impl != "official" else "–"
            d = diffs.get((impl, size))
            rows.append(f"{head} | {means[impl]:.2f} ({min(secs):.2f}) | {1e6 * means[impl] / px:.1f} | "
                        f"{peak / 2**30:.2f} | {grow / px:.0f} | {ratio} | {'–' if d is None else f'{d[0]:.2e}'}"
                        + (f" ({d[1]} non-finite px)" if d and d[1] else ""))
    return "\n".join("| " + r + " |" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, required=True, help="checkout of github.com/lifengcs/BlindDiff")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="eps-predicting MCFormer safetensors")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="photo to take the centre LR crops from")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="LR sides (output is 4x)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="rounds (each implementation once per round)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="RLIMIT_AS of each child (CPU)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child run")
    p.add_argument("--tile-budget-gb", type=float, default=3.0, help="blindsr-tiled: blindsr sr's default budget")
    p.add_argument("--tiled-always", action="store_true", help="blindsr-tiled also where untiled fits the cap")
    p.add_argument("--no-repeat-after", type=float, default=300.0, help="a run longer than this is not repeated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="what to run (official-keep: the "
                   "official code with blindsr's allocator setting, device.keep_freed_memory)")
    p.add_argument("--check-steps", type=int, default=20, help="extra equality check with this many steps "
                   "(at LR --check-size, untimed; 0 = none): a few-step eps sampler can diverge, see the docs")
    p.add_argument("--check-size", type=int, default=32)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import numpy as np
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, weights {args.weights.name}, "
          f"steps {args.steps}, image {args.image.name if args.image.is_file() else 'synthetic'}, einops "
          f"{'installed' if importlib.util.find_spec('einops') else 'missing (stand-in)'}", flush=True)
    results: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_official_"))  # the outputs (.npy), kept for inspection
    if args.check_steps:
        pair = ("official", "blindsr")
        n, out = args.check_steps, [tmp / f"check_{impl}.npy" for impl in pair]
        rs = [run_child(args, impl, args.check_size, o, steps=n) for impl, o in zip(pair, out, strict=True)]
        if all(o.is_file() for o in out):
            d = float(np.abs(np.load(out[0]) - np.load(out[1])).max())
            print(f"equality check, {n} steps, LR {args.check_size}²: max abs diff {d:.2e} "
                  f"(official unclamped max |x0| {rs[0]['raw_absmax']:.3g})", flush=True)
        else:
            print(f"equality check failed: {[r.get('status') for r in rs]}", flush=True)
    for size in args.sizes:
        for rnd in range(args.repeat):
            for impl in args.impls:
                prev = results.setdefault((impl, size), [])
                if prev and (prev[0].get("status") != "ok" or prev[0]["seconds"] > args.no_repeat_after):
                    continue  # OOM / timeout / not tiled / too long: not repeated
                fits = impl == "blindsr-tiled" and results.get(("blindsr", size), [{}])[-1].get("status") == "ok"
                if fits and not args.tiled_always:
                    prev[:] = [{"status": "not run (untiled fits the cap)"}]
                    continue
                r = run_child(args, impl, size, tmp / f"{impl}_{size}_{rnd}.npy")
                if r.get("status") == "not tiled":
                    r["status"] = f"not tiled (fits {args.tile_budget_gb:g} GiB)"
                prev.append(r)
                print(f"  {size}² {impl:14s} round {rnd}: " + (f"{r['seconds']:.2f} s, peak "
                      f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("status") == "ok" else r["status"]), flush=True)
    diffs = {}
    for size in args.sizes:
        ref = tmp / f"official_{size}_0.npy"
        for impl in (i for i in args.impls if i != "official"):
            out = tmp / f"{impl}_{size}_0.npy"
            if ref.is_file() and out.is_file():  # over the pixels finite in both; the others are counted
                a, b = np.load(ref), np.load(out)
                ok = np.isfinite(a) & np.isfinite(b)
                diffs[(impl, size)] = (float(np.abs(a - b)[ok].max()), int((~ok).sum()))
    print(fmt_table(args, results, diffs))
    for size in args.sizes:
        raw = [r["raw_absmax"] for r in results.get(("official", size), []) if r.get("raw_absmax") is not None]
        if raw and not all(math.isfinite(v) and v <= 10 for v in raw):
            worst = next((v for v in raw if not math.isfinite(v)), max(raw))  # NaN / inf first
            print(f"note: at LR {size}² the official sample reached max |x| = {worst:.3g} before clamping "
                  f"(the {args.steps}-step sampler diverged, in both codes): max abs diff is of clamped garbage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
