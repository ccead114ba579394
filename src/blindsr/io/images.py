"""Robust image reading and writing, atomic outputs, and folder listing.

Reading (:func:`load_image`, :func:`read_image`)
    PNG, JPEG, WebP, TIFF, BMP (also GIF/PPM, first frame), 8- or 16-bit; grayscale, palette, RGB(A), CMYK
    (Pillow's plain conversion, ICC profiles are ignored) and YCbCr. The EXIF orientation is applied.
    Images are float32 tensors in [0, 1], ``(3, H, W)``. 16-bit colour PNG/TIFF files, which Pillow only
    decodes to 8 bits, are read at full precision: Pillow decodes the file twice, once for the high bytes and
    once with the byte order swapped for the low bytes (:func:`_read_16bit_colour`).

    - Grayscale comes back as 3 identical channels with ``is_gray=True``; write ``rgb.mean(0, keepdim=True)``
      to get a gray file back.
    - Alpha policy: alpha is NOT composited. It is returned separately as ``alpha`` ``(1, H, W)``; the caller
      processes the colour (e.g. super-resolves it), upscales the alpha with bicubic, and passes it back to
      :func:`write_image` (``alpha=``) to recombine.
    - Decompression-bomb guard: the pixel count is read from the header and checked against ``max_pixels``
      (default :data:`DEFAULT_MAX_PIXELS`, overridden by the environment variable ``BLINDSR_MAX_PIXELS``)
      before anything is decoded. That limit governs Pillow's own check too: while blindsr opens and decodes
      a file, ``PIL.Image.MAX_IMAGE_PIXELS`` is set to it (and restored after), so the setting can raise the
      limit past Pillow's default ceiling (~179 MP) as well as lower it.
    - Every failure is an :class:`~blindsr.errors.ImageError` with a one-line message naming the file. Pillow's
      warnings about a file (e.g. "Corrupt EXIF data", after which the EXIF orientation is ignored) come back
      as one ``UserWarning`` whose message starts with the file's path.

Writing (:func:`write_image`, :func:`atomic_write`, :func:`write_bytes_atomic`)
    The format follows the suffix. Data go to a temp file in the destination folder, are fsynced, then renamed
    over the destination, so a crash never leaves a half-written output. Outputs never replace an input, and
    replace an existing file only with ``overwrite=True``. Metadata (EXIF, ICC) is not written.

Folders (:func:`list_images`, :func:`output_path_for`, :func:`check_output_folder`)
    Files and folders in, image files out (natural order), plus the non-image files (and broken symbolic
    links) that were skipped; :func:`not_image_reason` says why a file is not taken as an image. Output paths
    are refused early when the output folder is a file (an input, say) or an output would be its own input.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from blindsr.errors import BlindSRError, ImageError

DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 Mi pixels; env BLINDSR_MAX_PIXELS overrides
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM")  # Pillow plugins allowed to open files (JPEG covers MPO)
_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".bmp": "BMP"}
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a")


@dataclass
class LoadedImage:
    """A decoded image. ``rgb`` (3,H,W) float32 in [0,1]; ``alpha`` (1,H,W) or None.

    ``is_gray``: the file was grayscale (the 3 channels are equal). ``bit_depth``: 8 or 16, the depth to write
    back at to keep the file's precision.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    is_gray: bool
    bit_depth: int
    path: Path

    @property
    def height(self) -> int:
        return self.rgb.shape[-2]

    @property
    def width(self) -> int:
        return self.rgb.shape[-1]


# ----------------------------------------------------------------------------------------------- reading

def default_max_pixels() -> int:
    """The pixel limit: ``BLINDSR_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    env = os.environ.get("BLINDSR_MAX_PIXELS")
    if not env:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(env))
    except ValueError:
        raise BlindSRError(f"BLINDSR_MAX_PIXELS={env!r}: not a number") from None
    if value <= 0:
        raise BlindSRError(f"BLINDSR_MAX_PIXELS={env!r}: must be positive")
    return value


def read_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """The image at ``path`` as a (3,H,W) float32 tensor in [0,1] (alpha dropped, gray as 3 channels)."""
    return load_image(path, max_pixels).rgb


def load_image(path: str | Path, max_pixels: int | None = None) -> LoadedImage:
    """Decode ``path`` (see the module docstring). ``max_pixels=None``: :func:`default_max_pixels`."""
    path = Path(path)
    limit = default_max_pixels() if max_pixels is None else max_pixels
    _check_readable(path)
    try:
        with warnings.catch_warnings(record=True) as caught, _pillow_pixel_limit(limit):
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below
            with Image.open(path, formats=_READ_FORMATS) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageError(f"{path}: {w}x{h} = {_mp(w * h)} is {_over(limit)}")
                arr, bit_depth = _decode(im, path)
                orientation = _exif_orientation(im)
    except BlindSRError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's check, run at our limit (over 2x it, or a tile)
        count = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{_mp(int(count[1]))} is " if count else ""
        raise ImageError(f"{path}: {size}{_over(limit)}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image, or not a format blindsr reads "
                         "(PNG, JPEG, WebP, TIFF, BMP)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({_first_line(e)})") from None
    _rewarn(caught, path)
    arr = _apply_orientation(arr, orientation)
    t = torch.from_numpy(np.require(arr.transpose(2, 0, 1), requirements=["C", "W"]))
    is_gray = t.shape[0] in (1, 2)
    color, alpha = (t[:-1], t[-1:]) if t.shape[0] in (2, 4) else (t, None)
    rgb = color.expand(3, -1, -1).contiguous() if is_gray else color
    return LoadedImage(rgb=rgb, alpha=alpha, is_gray=is_gray, bit_depth=bit_depth, path=path)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels" if pixels >= 100_000 else f"{pixels} pixels"


def _over(limit: int) -> str:
    return f"over the limit of {_mp(limit)} (set BLINDSR_MAX_PIXELS to raise it)"


def _rewarn(caught: list, path: Path) -> None:
    """Pillow's warnings while reading ``path``, again as one-line UserWarnings naming the file."""
    seen = set()
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            continue
        text = " ".join(_first_line(w.message).split())
        if not issubclass(w.category, UserWarning):  # e.g. a DeprecationWarning: not about the file
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif text not in seen:
            seen.add(text)
            hint = " (EXIF ignored: the image is not rotated)" if "EXIF" in text else ""
            warnings.warn(f"{path}: {text}{hint}", UserWarning, stacklevel=3)


# Pillow's decompression-bomb ceiling is the module global PIL.Image.MAX_IMAGE_PIXELS. While blindsr reads a
# file it is set to the largest limit in use (each call also checks its own limit from the header); the
# count of active readers makes overlapping reads in threads restore the user's value exactly once.
_PIL_LOCK = threading.Lock()
_pil_limits: list[int] = []
_pil_saved: list = []


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int) -> Iterator[None]:
    with _PIL_LOCK:
        if not _pil_limits:
            _pil_saved[:] = [Image.MAX_IMAGE_PIXELS]
        _pil_limits.append(limit)
        Image.MAX_IMAGE_PIXELS = max(_pil_limits)
    try:
        yield
    finally:
        with _PIL_LOCK:
            _pil_limits.remove(limit)
            Image.MAX_IMAGE_PIXELS = max(_pil_limits) if _pil_limits else _pil_saved.pop()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")


def _decode(im: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """(H,W,C) float32 in [0,1] with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA); and the bit depth."""
    mode, raw = im.mode, _rawmode(im)
    if raw in _SWAP16 or raw == "LA;16B":
        return _read_16bit_colour(im, path, raw).astype(np.float32) / 65535, 16
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32)[..., None] / 65535, 16
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535 is not supported")
        return a.astype(np.float32)[..., None] / 65535, 16
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all() or a.size and (a.min() < 0 or a.max() > 1):
            raise ImageError(f"{path}: floating-point image with values outside [0, 1] is not supported")
        return a[..., None], 16
    has_tRNS = "transparency" in im.info
    if mode == "1" or (mode == "L" and not has_tRNS):
        im = im.convert("L")
    elif mode == "LA" or (mode == "L" and has_tRNS):
        im = im.convert("LA")
    elif mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and has_tRNS):
        im = im.convert("RGBA")
    elif mode in ("RGB", "RGBX", "P", "CMYK", "YCbCr", "HSV"):
        im = im.convert("RGB")
    else:
        raise ImageError(f"{path}: unsupported image mode {mode!r}")
    a = np.asarray(im)
    return (a[..., None] if a.ndim == 2 else a).astype(np.float32) / 255, 8


# 16-bit colour: Pillow's decoders un-filter / decompress at full precision but its unpackers keep only the
# high byte of each sample. Decoding again with the byte order swapped keeps the low bytes instead.
_NATIVE16 = "16L" if sys.byteorder == "little" else "16B"
_SWAP16 = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B"}


def _rawmode(im: Image.Image) -> str | None:
    """The raw mode of the first tile, with Pillow's native-order ``16N`` spelled out."""
    if not im.tile:
        return None
    args = im.tile[0][3]
    raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
    return raw.replace("16N", _NATIVE16) if isinstance(raw, str) else None


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    args = tile[3]
    new_args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    return tile._replace(args=new_args) if hasattr(tile, "_replace") else (*tile[:3], new_args)


def _read_16bit_colour(im: Image.Image, path: Path, raw: str) -> np.ndarray:
    """(H,W,C) uint16 of a 16-bit RGB / RGBA / gray+alpha PNG or TIFF."""
    with Image.open(path, formats=_READ_FORMATS) as again:
        if raw == "LA;16B":  # gray+alpha: read the 4 raw bytes L_hi, L_lo, A_hi, A_lo as "RGBA"
            again.tile = [_with_rawmode(t, "RGBA") for t in again.tile]
            b = np.asarray(again).astype(np.uint16)
            return np.stack([(b[..., 0] << 8) | b[..., 1], (b[..., 2] << 8) | b[..., 3]], axis=-1)
        again.tile = [_with_rawmode(t, _SWAP16[_rawmode_of(t)]) for t in again.tile]
        low = np.asarray(again).astype(np.uint16)
    high = np.asarray(im).astype(np.uint16)
    return (high << 8) | low


def _rawmode_of(tile: tuple) -> str:
    args = tile[3]
    return (args if isinstance(args, str) else args[0]).replace("16N", _NATIVE16)


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make an otherwise good image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip (H,W,C) so it displays upright (EXIF tag 0x0112; same result as ImageOps.exif_transpose)."""
    ops = {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],                      # mirror left-right
        3: lambda x: x[::-1, ::-1],                   # rotate 180
        4: lambda x: x[::-1],                         # mirror top-bottom
        5: lambda x: x.transpose(1, 0, 2),            # transpose
        6: lambda x: np.rot90(x, k=-1),               # rotate 90 clockwise
        7: lambda x: x[::-1, ::-1].transpose(1, 0, 2),  # transverse
        8: lambda x: np.rot90(x, k=1),                # rotate 90 counter-clockwise
    }
    return ops[orientation](a)


# ----------------------------------------------------------------------------------------------- writing

def check_output_path(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Raise a :class:`BlindSRError` if ``path`` is one of ``inputs``, or exists and ``overwrite`` is False, or
    cannot be created because a folder above it is a file.

    Call it before expensive work so a doomed run fails at once; the writers call it again.
    """
    path = Path(path)
    target = path.resolve()
    for inp in inputs:
        inp = Path(inp)
        if inp.resolve() == target or (path.exists() and inp.exists() and os.path.samefile(inp, path)):
            raise BlindSRError(f"{path}: refusing to write over an input file")
    if path.is_dir():
        raise BlindSRError(f"{path}: is a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise BlindSRError(f"{path}: cannot be written: {blocker} is a file, not a folder")
    if path.exists() and not overwrite:
        raise BlindSRError(f"{path}: output exists (use --overwrite to replace it)")
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest existing folder-to-be above ``path`` when it is not a folder (a file), else None."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def check_output_folder(out_dir: str | Path, inputs: Iterable[str | Path] = (), option: str = "-o/--output") -> Path:
    """Raise a one-line :class:`BlindSRError` unless ``out_dir`` is a folder or can be made one.

    An input file given as the output folder (``blindsr sr photo.png -o photo.png``) is named as such; any
    other existing file, or a file where a parent folder should be, is refused too. ``option``: the flag to
    name in the message. Cheap (a few ``stat`` calls): call it before loading models.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        for inp in map(Path, inputs):
            if inp.exists() and os.path.samefile(inp, out_dir):
                raise BlindSRError(f"{option} {out_dir}: is an input file; give an output folder")
        raise BlindSRError(f"{option} {out_dir}: exists and is not a folder; give an output folder")
    blocker = _file_above(out_dir)
    if blocker is not None:
        raise BlindSRError(f"{option} {out_dir}: cannot create this folder: {blocker} is a file, not a folder")
    return out_dir


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, fsync it and rename it to ``path``.

    On error the temp file is removed and ``path`` is untouched. With ``overwrite=False`` the final step is a
    hard link, which fails if ``path`` appeared meanwhile (falls back to rename where links are unsupported).
    """
    path = check_output_path(path, overwrite=overwrite, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None,
                 overwrite: bool = True, inputs: Iterable[str | Path] = ()) -> Iterator[IO]:
    """``with atomic_write(p, "w") as f: json.dump(obj, f)``: an ``open()`` whose result appears atomically."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp, open(tmp, mode, encoding=encoding,
                                                                             newline=newline) as f:
        yield f


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = True,
                       inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", overwrite=overwrite, inputs=inputs) as f:
        f.write(data)
    return Path(path)


def _create_temp(path: Path) -> Path:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:  # O_EXCL: never reuse a file; mode 0o666 & ~umask like a normal open()
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise BlindSRError(f"{path}: cannot create a temporary file beside it")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise BlindSRError(f"{path}: output exists (use --overwrite to replace it)") from None
    except OSError:  # filesystem without hard links
        os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_image(path: str | Path, img: torch.Tensor | np.ndarray, *, bit_depth: int = 8, quality: int = 95,
                overwrite: bool = False, inputs: Iterable[str | Path] = (),
                alpha: torch.Tensor | np.ndarray | None = None) -> Path:
    """Write ``img`` (C,H,W) with C in {1, 3, 4} (or (H,W)), values in [0,1], atomically; returns the path.

    The format follows the suffix: .png (8 or 16 bits), .jpg/.jpeg (8 bits, ``quality``; chroma is not
    subsampled at quality >= 90), .webp (lossless at ``quality`` 100), .tif/.tiff (LZW; 16 bits for
    grayscale only), .bmp. ``alpha`` (1,H,W) is appended to a 1- or 3-channel ``img``. Values are clamped to
    [0,1] and rounded; NaN becomes 0. ``inputs``: paths that must never be overwritten.
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image suffix {path.suffix!r} (use one of {', '.join(_WRITE_FORMATS)})")
    if bit_depth not in (8, 16):
        raise ValueError(f"write_image: bit_depth must be 8 or 16, not {bit_depth}")
    a = _to_hwc(img, alpha)
    channels = a.shape[-1]
    if fmt == "JPEG" and channels in (2, 4):
        raise ImageError(f"{path}: JPEG cannot store an alpha channel (write .png, .webp or .tif)")
    if bit_depth == 16 and not (fmt == "PNG" or (fmt == "TIFF" and channels == 1)):
        raise ImageError(f"{path}: 16-bit output needs .png (or .tif for grayscale)")
    try:
        if bit_depth == 16:
            q = np.rint(a * 65535).astype(np.uint16)
            data = encode_png16(q) if fmt == "PNG" else _pil_bytes(Image.fromarray(q[..., 0]), "TIFF")
        else:
            q = np.rint(a * 255).astype(np.uint8)
            pil = Image.fromarray(q[..., 0] if channels == 1 else q)  # L, LA, RGB or RGBA
            if fmt == "BMP" and channels == 2:
                pil = pil.convert("RGBA")
            data = _pil_bytes(pil, fmt, quality)
    except OSError as e:  # an encoder Pillow was built without
        raise ImageError(f"{path}: cannot encode as {fmt} ({_first_line(e)})") from None
    try:
        write_bytes_atomic(path, data, overwrite=overwrite, inputs=inputs)
    except BlindSRError as e:
        raise ImageError(str(e)) from None
    return path


def write_like_input(target: str | Path, out: torch.Tensor, like: LoadedImage, *, overwrite: bool,
                     inputs: Iterable[str | Path] = ()) -> None:
    """Write ``out`` (3, H', W') the way the input ``like`` (a LoadedImage) was stored: grayscale back to
    grayscale (BT.601 luma), the input's bit depth, and its alpha channel upscaled (bicubic) to H' x W'."""
    from blindsr.degradations.operators import imresize

    if like.is_gray:
        out = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    alpha = None
    if like.alpha is not None:
        alpha = imresize(like.alpha[None].float(), size=tuple(out.shape[-2:]))[0].clamp(0, 1)
    write_image(target, out, bit_depth=like.bit_depth, overwrite=overwrite, inputs=inputs, alpha=alpha)


def _to_hwc(img: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """(H,W,C) float32 in [0,1] from a (C,H,W) or (H,W) tensor/array plus an optional alpha."""
    def as_chw(x: torch.Tensor | np.ndarray) -> np.ndarray:
        x = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        return x[None] if x.ndim == 2 else x

    a = as_chw(img)
    if a.ndim != 3 or a.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"write_image: expected (C,H,W) with C in {{1,3,4}}, got shape {tuple(a.shape)}")
    if alpha is not None:
        al = as_chw(alpha)
        if a.shape[0] not in (1, 3) or al.shape != (1, *a.shape[1:]):
            raise ValueError(f"write_image: alpha of shape {tuple(al.shape)} does not fit an image of shape "
                             f"{tuple(a.shape)} (need (1,H,W) with a 1- or 3-channel image)")
        a = np.concatenate([a, al], axis=0)
    return np.clip(np.nan_to_num(a.transpose(1, 2, 0), nan=0.0), 0.0, 1.0)


def _pil_bytes(pil: Image.Image, fmt: str, quality: int = 95) -> bytes:
    import io

    options: dict = {
        "JPEG": {"quality": quality, **({"subsampling": 0} if quality >= 90 else {})},
        "WEBP": {"quality": quality, "lossless": quality >= 100},
        "TIFF": {"compression": "tiff_lzw"},
        "PNG": {"compress_level": 6},
    }.get(fmt, {})
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **options)
    return buf.getvalue()


def encode_png16(a: np.ndarray, level: int = 6) -> bytes:
    """A 16-bit PNG from (H,W,C) uint16, C in 1..4 (gray, gray+alpha, RGB, RGBA), Paeth-filtered.

    Pillow cannot write 16-bit colour PNGs, so we write the chunks ourselves (PNG spec, ISO/IEC 15948).
    """
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    rows = np.concatenate([np.full((h, 1), 4, np.uint8), _paeth_filter(raw, bpp=c * 2)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth_filter(raw: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 4 on (H, row_bytes) uint8: each byte minus the Paeth predictor of left/up/up-left."""
    r = raw.astype(np.int16)
    left = np.zeros_like(r)
    left[:, bpp:] = r[:, :-bpp]
    up = np.zeros_like(r)
    up[1:] = r[:-1]
    up_left = np.zeros_like(r)
    up_left[1:, bpp:] = r[:-1, :-bpp]
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    return ((r - pred) & 0xFF).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- folders

def list_images(paths: str | Path | Iterable[str | Path], recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, skipped files) from files and folders; a missing path is an :class:`ImageError`.

    Arguments keep their order; each folder's files come in natural order ("img2" before "img10"). Hidden
    files and folders inside a folder are ignored. A file counts as an image when its suffix is one of
    :data:`IMAGE_SUFFIXES` and its first bytes are an image signature (:func:`not_image_reason` says why not);
    broken symbolic links inside a folder are skipped files too. Skipped files trigger one warning.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            if p.is_symlink():
                raise ImageError(f"{p}: broken symbolic link (to {os.readlink(p)}, which does not exist)")
            raise ImageError(f"{p}: no such file or folder")
        candidates = [p] if not p.is_dir() else sorted(_walk(p, recursive), key=lambda f: natural_key(f.relative_to(p)))
        for f in candidates:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            (files if is_image_file(f) else skipped).append(f)
    if skipped:
        names = ", ".join(_skipped_name(s) for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} non-image file(s): {names}", stacklevel=2)
    return files, skipped


def _skipped_name(path: Path) -> str:
    return f"{path} (broken link)" if is_broken_link(path) else str(path)


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                yield from _walk(entry, recursive)
        elif entry.is_file() or is_broken_link(entry):  # a broken link is reported as skipped, not dropped
            yield entry


def is_broken_link(path: str | Path) -> bool:
    """A symbolic link whose target does not exist."""
    path = Path(path)
    return path.is_symlink() and not path.exists()


def is_image_file(path: str | Path) -> bool:
    """Suffix in :data:`IMAGE_SUFFIXES` and an image signature in the first bytes (no decoding)."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return _has_signature(head)


def _has_signature(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def not_image_reason(path: str | Path) -> str | None:
    """Why :func:`is_image_file` rejects ``path``, as a short phrase; None when it is an image file."""
    path = Path(path)
    if is_broken_link(path):
        return f"broken symbolic link to {os.readlink(path)}"
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "a folder"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        what = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        return f"{what}; image files end in {', '.join(IMAGE_SUFFIXES)}"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot read it: {e.strerror or type(e).__name__}"
    if not head:
        return "empty file"
    if not _has_signature(head):
        return f"its contents are not {path.suffix.lstrip('.').upper()} data (no PNG/JPEG/WebP/TIFF/BMP signature)"
    return None


def natural_key(path: str | Path) -> tuple:
    """Sort key that orders digit runs by value: ``a2.png < a10.png``."""
    parts = re.split(r"(\d+)", str(path))
    return tuple(int(s) if i % 2 else s.lower() for i, s in enumerate(parts)), str(path)


def output_path_for(input_path: str | Path, input_root: str | Path | None, out_dir: str | Path,
                    suffix: str | None = ".png") -> Path:
    """Where the output for ``input_path`` goes: ``out_dir / <path relative to input_root>`` with ``suffix``.

    Sub-folders under ``input_root`` (a recursive folder input) are kept; an input outside ``input_root`` (or
    ``input_root=None``) lands directly in ``out_dir``. ``suffix=None`` keeps the input's suffix.
    Raises a one-line :class:`BlindSRError` at once (before any expensive work) when ``out_dir`` is a file
    (:func:`check_output_folder`: e.g. the input itself, ``-o photo.png``) or the output would be the input.
    """
    input_path = Path(input_path)
    check_output_folder(out_dir, [input_path])
    target = Path(out_dir) / output_name(input_path, input_root, suffix)
    if target.resolve() == input_path.resolve() or (target.exists() and os.path.samefile(target, input_path)):
        raise BlindSRError(f"{input_path}: its output {target} would replace the input; choose another output folder")
    return target


def output_name(input_path: str | Path, input_root: str | Path | None, suffix: str | None = ".png") -> Path:
    """The relative part of :func:`output_path_for` (no checks): the path under ``input_root`` or the name."""
    input_path = Path(input_path)
    rel = Path(input_path.name)
    if input_root is not None and Path(input_root).is_dir():
        with contextlib.suppress(ValueError):
            rel = input_path.resolve().relative_to(Path(input_root).resolve())
    return rel if suffix is None else rel.with_suffix(suffix)
