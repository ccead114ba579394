"""Helpers shared by CLI commands: common options and the keep-going batch loop."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
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


# Files skipped while listing the inputs (non-images, broken links), as "path (reason)": printed when they are
# found and again in the end-of-run report of ``run_batch``. ``collect_inputs`` clears it when it starts and
# ``run_batch`` after its report.
_skipped: list[str] = []


def with_name(name: str, message: str) -> str:
    """``message`` prefixed with ``name`` unless it already starts with it (most file errors do)."""
    if message == name or message.startswith((f"{name}:", f"{name} ")):
        return message
    return f"{name}: {message}"


def run_batch(items: Iterable[Any], fn: Callable[[Any], str | None], name: Callable[[Any], str] = str,
              quiet: bool = False) -> int:
    """Apply ``fn`` to each item, keep going past user errors, report failures at the end.

    ``fn`` returns an optional one-line message that is printed per item. Returns the exit code:
    0 when all succeeded, 3 when some failed (the failures are listed on stderr), 2 when all failed.
    Each error line names its item once (``name(item): message``). The end-of-run report also lists the
    files that ``collect_inputs`` / ``list_inputs`` skipped.
    """
    from blindsr.errors import BlindSRError

    items = list(items)
    failed: list[str] = []
    for item in items:
        try:
            msg = fn(item)
            if msg and not quiet:
                print(msg, flush=True)
        except BlindSRError as e:
            failed.append(with_name(name(item), str(e)))
            print(f"blindsr: error: {failed[-1]}", file=sys.stderr, flush=True)
    if failed:
        print(f"blindsr: {len(failed)} of {len(items)} input(s) failed:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
    if _skipped:
        print(f"blindsr: skipped {len(_skipped)} file(s) that are not images: {_some(_skipped)}", file=sys.stderr)
        _skipped.clear()
    if failed:
        return 2 if len(failed) == len(items) else 3
    return 0


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", and {len(names) - n} more" if len(names) > n else "")


def list_inputs(arg: str | Path, recursive: bool = False) -> list[Path]:
    """The image files of one input argument (a folder, or a file that must be an image).

    Files skipped inside a folder (non-images, broken links) are reported as one stderr line per folder and
    remembered for the end-of-run report; an explicitly named file that is not an image, or a missing path,
    is a one-line :class:`BlindSRError` saying what is wrong with it.
    """
    from blindsr.errors import BlindSRError
    from blindsr.io.images import is_broken_link, list_images, not_image_reason

    with warnings.catch_warnings(record=True):  # reported below as one line
        warnings.simplefilter("always")
        files, skipped = list_images([arg], recursive=recursive)
    if skipped and not Path(arg).is_dir():
        raise BlindSRError(f"{arg}: not an image ({not_image_reason(skipped[0]) or 'not an image file'})")
    links = [s for s in skipped if is_broken_link(s)]
    others = [s for s in skipped if not is_broken_link(s)]
    if others:
        names = _some([_rel(s, arg) for s in others], 3)
        print(f"blindsr: skipped {len(others)} non-image file(s) in {arg}: {names}", file=sys.stderr)
    if links:
        print(f"blindsr: skipped {len(links)} broken symbolic link(s) in {arg}: "
              + _some([f"{_rel(s, arg)} (to {os.readlink(s)})" for s in links], 3),
              file=sys.stderr)
    _skipped.extend(f"{s} (broken link)" if s in links else str(s) for s in skipped)
    return files


def _rel(path: Path, folder: str | Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def collect_inputs(inputs: list[str], recursive: bool) -> list[tuple[Path, Path | None]]:
    """(file, folder input it came from or None), in argument order, duplicates removed.

    Non-image files and broken links inside folders are reported (one stderr line per folder, and again at the
    end of the run); a missing path raises. An explicitly named file that is not an image gets one line saying
    so: an error when nothing else is left to do, else a ``skipped`` line and the run goes on.
    """
    from blindsr.errors import BlindSRError

    _skipped.clear()
    out, seen, refused = [], set(), []
    for arg in inputs:
        try:
            files = list_inputs(arg, recursive)
        except BlindSRError as e:
            if not Path(arg).exists() or Path(arg).is_dir():
                raise  # a missing path (or a folder that cannot be listed)
            refused.append((arg, str(e)))
            continue
        root = Path(arg) if Path(arg).is_dir() else None
        for f in files:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append((f, root))
    if refused and not out:
        more = f" (and {len(refused) - 1} more input(s) that are not images)" if len(refused) > 1 else ""
        raise BlindSRError(refused[0][1] + more)
    for arg, msg in refused:
        print(f"blindsr: skipped {msg}", file=sys.stderr)
        _skipped.append(f"{arg} (not an image)")
    return out


def check_unique_outputs(targets: Mapping[Path, Path]) -> None:
    """Refuse, in one line naming both inputs, two inputs that would write the same output.

    ``targets``: input file -> its output path (``a.bmp`` and ``a.jpg`` both -> ``out/a.png``). Call it before
    any work: with ``--overwrite`` the second would silently replace the first, without it fail as "exists".
    """
    from blindsr.errors import BlindSRError

    first: dict[str, Path] = {}
    for f, target in targets.items():
        key = os.path.normcase(os.path.abspath(target))
        if key in first:
            raise BlindSRError(f"{first[key]} and {f} would both be written to {target}; rename one of them "
                               "or process them in separate runs")
        first[key] = f


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


def process_shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process under ``accelerate launch`` / ``torchrun`` (their
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables), (0, 1, 0) otherwise. The image commands need no
    communication between processes: each takes every ``world``-th input, starting at its ``rank``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return 0, 1, 0
    if world < 1 or not 0 <= rank < world:
        return 0, 1, 0
    return rank, world, local

