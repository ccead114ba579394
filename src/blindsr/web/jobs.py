"""The work behind ``blindsr web``, free of Gradio (tested without a browser): uploads become inputs in a
per-session folder, a job runs one method over them with progress, ETA and cancel, outputs are written as the
CLI writes them, and each job gets the CLI line that reproduces it.

Safety: nothing the browser sends is used as a path. An upload's name only names our copy of it (reduced to a
safe base name); zip members are read by their base names too, with limits on their count and unpacked size.
Weights come only from the server's side (``blindsr web`` flags, environment variables, the weights file).
"""

from __future__ import annotations

import re
import shlex
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blindsr.errors import BlindSRError
from blindsr.io.images import IMAGE_SUFFIXES

MAX_BATCH = 64  # images per job (uploads and zip members together)
MAX_ZIP_BYTES = 1 << 30  # unpacked bytes of one zip (a zip bomb stops here, before anything is decoded)


class Cancelled(BlindSRError):
    """The user cancelled the job (raised from the progress callback, between two units of work)."""


# ---------------------------------------------------------------------------------------------- inputs
def safe_name(name: str, taken: set[str]) -> str:
    """A base name made of ``[A-Za-z0-9._-]`` whose stem is not in ``taken`` (case-insensitive: two inputs
    never map to one output), which it joins."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name.replace("\\", "/")).name).lstrip(".") or "image"
    stem, suffix = Path(base).stem[:80] or "image", Path(base).suffix[:8]
    cand, n = stem, 1
    while cand.lower() in taken:
        n += 1
        cand = f"{stem}_{n}"
    taken.add(cand.lower())
    return cand + suffix


def gather_inputs(uploads: Iterable[str | Path], dest: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Copy uploaded files (images, or zips of images) into ``dest``; returns ``[(display name, copy)]`` and
    one-line messages for what was left out. A file's type is decided when it is decoded, not by its name."""
    dest.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    items: list[tuple[str, Path]] = []
    notes: list[str] = []

    def add(name: str, write: Callable[[Path], None]) -> None:
        if len(items) >= MAX_BATCH:
            notes.append(f"{name}: left out, a job takes at most {MAX_BATCH} images")
            return
        target = dest / safe_name(name, taken)
        write(target)
        items.append((Path(name).name, target))

    for up in uploads:
        up = Path(up)
        if zipfile.is_zipfile(up):
            _gather_zip(up, add, notes)
        else:
            add(up.name, lambda t, src=up: shutil.copyfile(src, t))
    return items, notes


def _gather_zip(path: Path, add: Callable[[str, Callable[[Path], None]], None], notes: list[str]) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()
                       and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
                       and not Path(m.filename).name.startswith(".") and "__MACOSX" not in Path(m.filename).parts]
            total = sum(m.file_size for m in members)
            if total > MAX_ZIP_BYTES:
                notes.append(f"{path.name}: unpacks to {total / 2**20:.0f} MiB, more than the "
                             f"{MAX_ZIP_BYTES / 2**20:.0f} MiB a zip may hold")
                return
            if not members:
                notes.append(f"{path.name}: a zip without images ({', '.join(IMAGE_SUFFIXES)})")
            for m in members:
                def write(t: Path, m: zipfile.ZipInfo = m) -> None:
                    with zf.open(m) as src, open(t, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                add(Path(m.filename).name, write)
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # RuntimeError: encrypted members
        notes.append(f"{path.name}: cannot read this zip ({str(e).splitlines()[0]})")


# ---------------------------------------------------------------------------------------------- progress
@dataclass
class Tracker:
    """Progress over a job of ``n`` images: ``report(done, total)`` (the library's progress callable) per unit
    of the current image; ``sink(fraction, text)`` shows it; a set ``cancel`` event stops the job."""

    n: int
    sink: Callable[[float, str], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    index: int = 0
    name: str = ""
    _t_image: float = field(default_factory=time.perf_counter)
    _per_image: list[float] = field(default_factory=list)

    def start_image(self, index: int, name: str) -> None:
        self.check()
        self.index, self.name, self._t_image = index, name, time.perf_counter()
        self.sink(index / self.n, f"image {index + 1}/{self.n} ({name}): starting")

    def end_image(self) -> None:
        self._per_image.append(time.perf_counter() - self._t_image)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")

    def report(self, done: int, total: int) -> None:
        self.check()
        elapsed = time.perf_counter() - self._t_image
        left = self.n - self.index - 1
        eta = ""
        if done > 0:
            this = elapsed / done * (total - done)
            per = sum(self._per_image) / len(self._per_image) if self._per_image else elapsed * total / done
            eta = f", ETA {_duration(this + left * per)}"
        frac = (self.index + done / max(total, 1)) / self.n
        self.sink(frac, f"image {self.index + 1}/{self.n} ({self.name}): {done}/{total}{eta}")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class PeakMemory:
    """Peak memory of the block: CUDA's allocator peak, or on the CPU the process's resident memory sampled
    every 20 ms (the process peak of ``getrusage`` would include earlier jobs)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        from blindsr.device import resident_memory

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self

        def poll() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, resident_memory())

        self.peak = resident_memory()
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- results
@dataclass
class ImageResult:
    name: str  # the upload's name (display only)
    output: Path  # what the CLI would write (bit depth, gray and alpha kept)
    preview: Path  # the bicubic-upscaled input at the output size, for the before/after slider
    kernel: Path | None  # BlindDiff: the estimated kernel, as a picture
    size_in: tuple[int, int]  # (w, h)
    size_out: tuple[int, int]
    seconds: float
    note: str = ""  # what the method chose for this image (DM-SR: its t̂)


@dataclass
class JobResult:
    images: list[ImageResult]
    errors: list[str]  # one line per input that failed (the job went on with the others)
    seconds: float
    peak_bytes: int
    seed: int
    cli: str  # the command that reproduces the job
    archive: Path | None  # all outputs as one zip (two or more images)
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class BlindDiffParams:
    """``blindsr sr``'s options that the page offers (None = the model's default, as in the CLI)."""

    model: str | None = None  # an embedded model (None: the default one)
    steps: int | None = None
    lam: float | None = None
    sampler: str | None = None
    tile: int | None = None  # HR tile; None: chosen from max_memory
    max_memory: str = "auto"
    seed: int = 0

    def cli(self, names: list[str]) -> str:
        from blindsr.weights import DEFAULT_MODEL

        opts = [("--model", self.model or DEFAULT_MODEL), ("--steps", self.steps), ("--lambda", self.lam),
                ("--sampler", self.sampler), ("--tile", self.tile),
                ("--max-memory", None if self.max_memory == "auto" else self.max_memory), ("--seed", self.seed)]
        return _cli_line("sr", names, opts, ["--save-kernel"])


@dataclass
class DiffBIRParams:
    """``blindsr restore``'s options that the page offers (None = the preset's default)."""

    stage1_only: bool = True
    version: str = "pixel"  # pixel (the embedded models, offline) or an SD version: v1 | v2 | v2.1
    task: str = "sr"
    cleaner_kind: str | None = None
    guidance_scale: float | None = None  # None: the preset's (1 for pixel, 0 for sd)
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    tile: int | None = None  # diffusion tile in pixels
    cleaner_tile: int | None = None
    color_fix: str | None = None
    seed: int = 0

    def cli(self, names: list[str]) -> str:
        sd = self.version != "pixel"
        opts = [("--backend", "sd" if sd else None), ("--version", self.version if sd else None),
                ("--task", self.task), ("--cleaner-kind", self.cleaner_kind),
                ("--cleaner-tile", self.cleaner_tile), ("--seed", self.seed)]
        if not self.stage1_only:
            opts[4:4] = [("--guidance-scale", self.guidance_scale), ("--sampler", self.sampler),
                         ("--steps", self.steps), ("--cfg", self.cfg), ("--tile", self.tile),
                         ("--color-fix", self.color_fix)]
        return _cli_line("restore", names, opts, ["--stage1-only"] if self.stage1_only else [])


@dataclass
class DMSRParams:
    """``blindsr sr --method dmsr``'s options; the checkpoint and SD-Turbo paths come from the server's side."""

    steps: int = 1
    t_hat: float | None = None  # None: estimated per image
    color_fix: str | None = None
    tile: int | None = None  # None: the model's (512)
    seed: int = 0
    encoder: str | None = None  # set by the server (blindsr web --dmsr-encoder)
    sd_turbo: str | None = None  # set by the server (blindsr web --sd-turbo)

    def cli(self, names: list[str]) -> str:
        opts = [("--method", "dmsr"), ("--encoder", self.encoder), ("--sd-turbo", self.sd_turbo),
                ("--steps", self.steps), ("--t-hat", self.t_hat), ("--color-fix", self.color_fix),
                ("--tile", self.tile), ("--seed", self.seed)]
        return _cli_line("sr", names, opts, [])


def dmsr_missing(encoder: str | None, sd_turbo: str | None) -> str | None:
    """Why a DM-SR job cannot run (which files it needs and how to give them), or None."""
    from blindsr.methods.dmsr.pipeline import read_checkpoint

    if not encoder:
        from blindsr.weights import part_path

        if part_path("dmsr-s").is_file():
            return None  # the embedded DM-SR-S
        return ("no DM-SR checkpoint: start the page with `blindsr web --dmsr-encoder FILE` (this copy of blindsr "
                "has no embedded DM-SR-S; train one with `blindsr train dmsr --config configs/dmsr_s.yaml`)")
    try:
        meta, _ = read_checkpoint(encoder)
    except BlindSRError as e:
        return str(e)
    if meta.get("backend") == "sd-turbo" and not sd_turbo:
        return (f"{Path(encoder).name} runs on SD-Turbo: start the page with `--sd-turbo PATH` too (a local "
                "diffusers folder with unet/, vae/, text_encoder/, or a single .safetensors)")
    return None


def blinddiff_defaults(model: str | None) -> tuple[int, float]:
    """(sampling steps, λ) an embedded model uses when none are given: the page's initial values."""
    from blindsr.methods.blinddiff.config import BlindDiffConfig
    from blindsr.methods.blinddiff.pipeline import read_config, split_config
    from blindsr.weights import DEFAULT_MODEL, embedded_path

    d = read_config(embedded_path(model or DEFAULT_MODEL)) or {}
    process = split_config(d)[1] if d else {}
    base = BlindDiffConfig()
    return int(process.get("sample_steps", base.sample_steps)), float(process.get("lam", base.lam))


def _cli_line(command: str, names: list[str], opts: list[tuple[str, Any]], flags: list[str]) -> str:
    words = ["blindsr", command, *names, "-o", "out/"]
    for flag, value in opts:
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words + flags)


def diffbir_missing(params: DiffBIRParams, weights: dict[str, str | None]) -> str | None:
    """Why a DiffBIR job cannot run (the weight files it needs and where to put them), or None."""
    from blindsr.methods.diffbir import resolve_weights

    try:
        resolve_weights(params.version, params.task, stage1_only=params.stage1_only,
                        cleaner_kind=params.cleaner_kind, **_weights_for(params, weights))
    except BlindSRError as e:
        return str(e)
    return None


def _weights_for(params: DiffBIRParams, weights: dict[str, str | None]) -> dict[str, str | None]:
    """The server's weight paths that apply: SD and its ControlNet only to the SD versions (a given cleaner
    serves both backends)."""
    return weights if params.version != "pixel" else {k: v for k, v in weights.items() if k not in ("sd", "controlnet")}


class Models:
    """The last pipeline loaded (one at a time: a second model would double the memory)."""

    def __init__(self, device: torch.device):
        self.device, self._key, self._pipe = device, None, None

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key != self._key:
            self._key, self._pipe = None, None  # free the old one before loading the next
            self._pipe, self._key = load(), key
        return self._pipe


def run_job(method: str, params: BlindDiffParams | DiffBIRParams | DMSRParams, inputs: list[tuple[str, Path]], out_dir: Path,
            models: Models, tracker: Tracker, weights: dict[str, str | None] | None = None) -> JobResult:
    """Run ``method`` (blinddiff | diffbir | dmsr) over ``inputs`` into ``out_dir`` (a fresh folder). Bad inputs are
    reported and skipped; a cancel ends the job after the current unit of work, keeping what was finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = models.device
    one = {"blinddiff": _blinddiff_one, "diffbir": _diffbir_one, "dmsr": _dmsr_one}[method]
    results, errors, cancelled = [], [], False
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        try:
            for i, (name, path) in enumerate(inputs):
                tracker.start_image(i, name)
                try:
                    results.append(one(name, path, params, out_dir, models, tracker, weights or {}))
                except Cancelled:
                    raise
                except BlindSRError as e:
                    errors.append(_named(str(e), name, path))
                tracker.end_image()
        except Cancelled:
            cancelled = True
    archive = _archive(results, out_dir) if len(results) > 1 else None
    return JobResult(results, errors, time.perf_counter() - t0, mem.peak, params.seed,
                     params.cli([n for n, _ in inputs]), archive, cancelled)


def _named(message: str, name: str, path: Path) -> str:
    """A library message about our copy of an upload, told with the upload's name."""
    message = message.replace(str(path), name)
    return message if message.startswith(name) else f"{name}: {message}"


def _load(path: Path):
    from blindsr.io.images import load_image

    return load_image(path)


def _finish(name: str, path: Path, img, sr: Tensor, out_dir: Path, t0: float, kernel: Tensor | None = None,
            note: str = "") -> ImageResult:
    """Write one image's results: the output as the CLI writes it (bit depth, gray, alpha as the input), the
    kernel picture (BlindDiff), and the bicubic-upscaled input at the output size (the slider's "before")."""
    from blindsr.degradations.operators import imresize
    from blindsr.io.images import write_image, write_like_input
    from blindsr.io.visual import save_kernel

    out = out_dir / f"{path.stem}.png"
    write_like_input(out, sr.float().cpu(), img, overwrite=False, inputs=[path])
    kernel_png = None
    if kernel is not None:
        kernel_png = out_dir / f"{path.stem}_kernel.png"
        save_kernel(kernel.cpu(), kernel_png, overwrite=False)
    h, w = sr.shape[-2:]
    preview = out_dir / "preview" / f"{path.stem}_bicubic.png"
    write_image(preview, imresize(img.rgb[None], size=(h, w))[0].clamp(0, 1), overwrite=True)
    return ImageResult(name, out, preview, kernel_png, (img.width, img.height), (w, h), time.perf_counter() - t0,
                       note)


def _blinddiff_one(name: str, path: Path, p: BlindDiffParams, out_dir: Path, models: Models, tracker: Tracker,
                   weights: dict) -> ImageResult:
    from blindsr.device import make_generator, memory_budget
    from blindsr.methods.blinddiff.pipeline import load_pipeline
    from blindsr.weights import DEFAULT_MODEL, embedded_path

    t0 = time.perf_counter()
    img = _load(path)
    model = p.model or DEFAULT_MODEL
    pipe = models.get(("blinddiff", model), lambda: load_pipeline(embedded_path(model), device=models.device))
    budget = memory_budget(p.max_memory, models.device)  # what sampling may use: in a long-running server the
    #  process's own memory (Gradio, the loaded models, freed-but-kept pages) is not charged to the job
    res = pipe(img.rgb[None].to(models.device), generator=[make_generator(p.seed, "cpu")], steps=p.steps,
               lam=p.lam, sampler=p.sampler, tile=p.tile, max_memory=budget, progress=tracker.report)
    return _finish(name, path, img, res.sr[0], out_dir, t0, kernel=res.kernel[0])


def _diffbir_one(name: str, path: Path, p: DiffBIRParams, out_dir: Path, models: Models, tracker: Tracker,
                 weights: dict) -> ImageResult:
    from blindsr.device import make_generator
    from blindsr.methods.diffbir import (
        DiffBIRConfig,
        DiffBIRPipeline,
        Tiling,
        resolve_weights,
    )

    t0 = time.perf_counter()
    img = _load(path)
    paths = resolve_weights(p.version, p.task, stage1_only=p.stage1_only, cleaner_kind=p.cleaner_kind,
                            **_weights_for(p, weights))
    base = DiffBIRConfig.from_preset(p.version, p.task)
    config = DiffBIRConfig.from_preset(
        p.version, p.task, sampler=p.sampler, steps=p.steps, cfg=p.cfg, color_fix=p.color_fix,
        guidance=replace(base.guidance, scale=base.guidance.scale if p.guidance_scale is None else p.guidance_scale),
        tiling=Tiling.from_options(tile=p.tile, cleaner_tile=p.cleaner_tile, base=base.tiling))
    key = ("diffbir", p.version, p.task, str(paths))
    pipe = models.get(key, lambda: DiffBIRPipeline.from_paths(config, paths, models.device))
    pipe = pipe.with_config(**{f: getattr(config, f) for f in ("sampler", "steps", "cfg", "color_fix",
                                                               "guidance", "tiling")})
    res = pipe(img.rgb[None], [make_generator(p.seed, "cpu")], stage1_only=p.stage1_only,
               progress=tracker.report)
    return _finish(name, path, img, res.image[0], out_dir, t0)


def _dmsr_one(name: str, path: Path, p: DMSRParams, out_dir: Path, models: Models, tracker: Tracker,
              weights: dict) -> ImageResult:
    from blindsr.methods.dmsr.pipeline import load_pipeline

    t0 = time.perf_counter()
    img = _load(path)
    pipe = models.get(("dmsr", p.encoder, p.sd_turbo),
                      lambda: load_pipeline(p.encoder, models.device, sd_turbo=p.sd_turbo))
    res = pipe(img.rgb[None], steps=p.steps, t_hat=p.t_hat, color_fix=p.color_fix, tile=p.tile,
               progress=tracker.report)
    return _finish(name, path, img, res.sr[0], out_dir, t0, note=f"t̂ {res.t_hat[0].item():.1f}")


def _archive(results: list[ImageResult], out_dir: Path) -> Path:
    """Every output (and kernel picture) in one zip, written atomically."""
    from blindsr.io.images import atomic_path

    target = out_dir / "blindsr-results.zip"
    with atomic_path(target, overwrite=True) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for r in results:  # PNGs are compressed already
            for f in (r.output, r.kernel):
                if f is not None:
                    zf.write(f, f.name)
    return target


def zoom_pair(before: Path, after: Path, cx: float, cy: float, crop: int = 128, factor: int = 3):
    """Side-by-side zoom: the same ``crop``² window of ``before`` and ``after`` (same size) around the relative
    centre (``cx``, ``cy``) in [0, 1], each enlarged ``factor``x with nearest neighbours (pixels stay pixels),
    with a 4-pixel white gap. A PIL image, 8-bit RGB (for display)."""
    from PIL import Image

    with Image.open(before) as a, Image.open(after) as b:
        w, h = b.size
        c = min(crop, w, h)
        left = round(min(max(cx * w - c / 2, 0), w - c))
        top = round(min(max(cy * h - c / 2, 0), h - c))
        box = (left, top, left + c, top + c)
        crops = [_rgb8(im.crop(box)).resize((c * factor, c * factor), Image.NEAREST) for im in (a, b)]
    sheet = Image.new("RGB", (2 * c * factor + 4, c * factor), "white")
    sheet.paste(crops[0], (0, 0))
    sheet.paste(crops[1], (c * factor + 4, 0))
    return sheet


def _rgb8(im):
    """Any PNG mode (16-bit, gray, alpha) as 8-bit RGB for display."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I"):  # 16-bit gray
        return Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB")
