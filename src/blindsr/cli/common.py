"""Helpers shared by CLI commands: common options and the keep-going batch loop."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def add_common(parser: argparse.ArgumentParser, device: bool = True, seed: bool = True) -> None:
    """Options every command takes: --device, --seed, --debug."""
    if device:
        parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default: auto)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output (default: 0)")
    # SUPPRESS: an absent flag must not override `blindsr --debug COMMAND`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")


def run_batch(items: Iterable[Any], fn: Callable[[Any], str | None], name: Callable[[Any], str] = str,
              quiet: bool = False) -> int:
    """Apply ``fn`` to each item, keep going past user errors, report failures at the end.

    ``fn`` returns an optional one-line message that is printed per item. Returns the exit code:
    0 when all succeeded, 3 when some failed (the failures are listed on stderr), 2 when all failed.
    """
    from blindsr.errors import BlindSRError

    items = list(items)
    failed: list[tuple[str, str]] = []
    for item in items:
        try:
            msg = fn(item)
            if msg and not quiet:
                print(msg, flush=True)
        except BlindSRError as e:
            failed.append((name(item), str(e)))
            print(f"blindsr: error: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"blindsr: {len(failed)} of {len(items)} input(s) failed:", file=sys.stderr)
        for n, msg in failed:
            print(f"  {n}: {msg}", file=sys.stderr)
        return 2 if len(failed) == len(items) else 3
    return 0


def collect_inputs(inputs: list[str], recursive: bool) -> list[tuple[Path, Path | None]]:
    """(file, folder input it came from or None), in argument order, duplicates removed.

    Non-image files inside folders are reported as one stderr line per folder; a missing path raises."""
    from blindsr.io.images import list_images

    out, seen = [], set()
    for arg in inputs:
        with warnings.catch_warnings(record=True):  # reported below as one line
            files, skipped = list_images([arg], recursive=recursive)
        if skipped:
            names = ", ".join(s.name for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            print(f"blindsr: skipped {len(skipped)} non-image file(s) in {arg}: {names}", file=sys.stderr)
        root = Path(arg) if Path(arg).is_dir() else None
        for f in files:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append((f, root))
    return out


def run_grouped(files: list[Path], batch_size: int, load: Callable[[Path], Any],
                infer: Callable[[list[Any]], Any], write: Callable[[Path, Any, Any, int, float], str | None],
                quiet: bool = False) -> int:
    """The image commands' loop: take ``batch_size`` files at a time, ``load`` each (a LoadedImage), run
    ``infer`` once per group of same-size images, ``write`` each result (file, image, result, index in
    the group, seconds per image). A user error fails only its file (or group) and the run keeps going;
    returns ``run_batch``'s exit code."""
    from blindsr.errors import BlindSRError

    done: dict[Path, str | None | BlindSRError] = {}  # results of the current batch, by input file

    def process(batch: list[Path]) -> None:
        groups: dict[tuple[int, int], list] = {}
        for f in batch:
            try:
                img = load(f)
                groups.setdefault((img.height, img.width), []).append((f, img))
            except BlindSRError as e:
                done[f] = e
        for group in groups.values():
            t0 = time.perf_counter()
            try:
                res = infer([img for _, img in group])
            except BlindSRError as e:
                done.update({f: e for f, _ in group})
                continue
            dt = (time.perf_counter() - t0) / len(group)
            for i, (f, img) in enumerate(group):
                try:
                    done[f] = write(f, img, res, i, dt)
                except BlindSRError as e:
                    done[f] = e

    position = {f: i for i, f in enumerate(files)}

    def one(f: Path) -> str | None:
        if f not in done:  # first image of a new batch: run the whole batch
            i = position[f]
            process(files[i:i + batch_size])
        result = done.pop(f)
        if isinstance(result, BlindSRError):
            raise result
        return result

    return run_batch(files, one, name=str, quiet=quiet)


def write_like_input(target: Path, out: Any, like: Any, *, overwrite: bool, inputs: list[Path]) -> None:
    """Write ``out`` (3, H', W') the way the input ``like`` (a LoadedImage) was stored: grayscale back to
    grayscale (BT.601 luma), the input's bit depth, and its alpha channel upscaled (bicubic) to H' x W'."""
    from blindsr.degradations.operators import imresize
    from blindsr.io.images import write_image

    if like.is_gray:
        out = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    alpha = None
    if like.alpha is not None:
        alpha = imresize(like.alpha[None].float(), size=tuple(out.shape[-2:]))[0].clamp(0, 1)
    write_image(target, out, bit_depth=like.bit_depth, overwrite=overwrite, inputs=inputs, alpha=alpha)
