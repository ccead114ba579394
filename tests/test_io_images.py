"""blindsr.io.images: decoding of many file kinds, round trips, bad inputs, atomic writes, folder listing."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blindsr.errors import BlindSRError, ImageError
from blindsr.io import images
from blindsr.io.images import (
    atomic_write,
    encode_png16,
    list_images,
    load_image,
    natural_key,
    output_path_for,
    read_image,
    write_bytes_atomic,
    write_image,
)


def rand_u8(h=12, w=17, c=3, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    return a[..., 0] if c == 1 else a


def to_u8(t: torch.Tensor) -> np.ndarray:
    return t.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def one_line_error(exc_info, name: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and name in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- round trips

def test_png8_roundtrip_exact(tmp_path):
    a = rand_u8()
    t = torch.from_numpy(a).permute(2, 0, 1).float().contiguous() / 255
    write_image(tmp_path / "x.png", t)
    img = load_image(tmp_path / "x.png")
    assert img.bit_depth == 8 and not img.is_gray and img.alpha is None
    assert img.rgb.dtype == torch.float32 and img.rgb.shape == (3, 12, 17)
    np.testing.assert_array_equal(to_u8(img.rgb), a)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), a)  # Pillow agrees


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_roundtrip_exact(tmp_path, channels):
    a = np.random.default_rng(channels).integers(0, 65536, (9, 13, channels), dtype=np.uint16)
    a[0, 0] = 0
    a[0, 1] = 65535
    t = torch.from_numpy(a.astype(np.float32) / 65535).permute(2, 0, 1).contiguous()
    p = write_image(tmp_path / "x16.png", t, bit_depth=16)
    img = load_image(p)
    assert img.bit_depth == 16 and img.is_gray == (channels in (1, 2))
    color = img.rgb[:1] if img.is_gray else img.rgb
    got = torch.cat([color] + ([img.alpha] if img.alpha is not None else []))
    assert (img.alpha is not None) == (channels in (2, 4))
    np.testing.assert_array_equal(got.double().mul(65535).round().permute(1, 2, 0).numpy().astype(np.uint16), a)
    # independent check of our encoder: Pillow's own decode keeps the high bytes (or all 16 bits for gray)
    pil = np.asarray(Image.open(p))
    if channels == 1:
        np.testing.assert_array_equal(pil, a[..., 0])
    elif channels in (3, 4):
        np.testing.assert_array_equal(pil, (a >> 8).astype(np.uint8))


def test_png16_keeps_low_bits(tmp_path):
    a = np.zeros((4, 4, 3), np.uint16)
    a[..., 0] = 1000 + np.arange(16).reshape(4, 4)  # differ only in the low byte
    (tmp_path / "low.png").write_bytes(encode_png16(a))
    rgb = read_image(tmp_path / "low.png")
    assert len(torch.unique(rgb[0])) == 16


def test_gray16_pillow_file(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (7, 9), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    Image.fromarray(a).save(tmp_path / "g.tif")
    for name in ("g.png", "g.tif"):
        img = load_image(tmp_path / name)
        assert img.is_gray and img.bit_depth == 16
        assert torch.equal(img.rgb[0], img.rgb[2])
        np.testing.assert_array_equal(img.rgb[0].double().mul(65535).round().numpy(), a)


def test_int32_tiff(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4) * 5000
    Image.fromarray(a).save(tmp_path / "i.tif")
    img = load_image(tmp_path / "i.tif")
    assert img.bit_depth == 16 and img.is_gray
    np.testing.assert_allclose(img.rgb[0].numpy() * 65535, a, atol=1e-2)
    Image.fromarray(a * 100).save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match="outside 0..65535") as e:
        load_image(tmp_path / "big.tif")
    one_line_error(e, "big.tif")


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff16_rgb(tmp_path, byteorder, compression):
    tifffile = pytest.importorskip("tifffile")
    a = np.random.default_rng(2).integers(0, 65536, (6, 11, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", a, photometric="rgb", byteorder=byteorder, compression=compression)
    img = load_image(tmp_path / "c.tif")
    assert img.bit_depth == 16
    np.testing.assert_array_equal(img.rgb.double().mul(65535).round().permute(1, 2, 0).numpy(), a)


def test_tiff16_gray_write(tmp_path):
    t = torch.rand(1, 5, 6, generator=torch.Generator().manual_seed(0))
    write_image(tmp_path / "g16.tif", t, bit_depth=16)
    img = load_image(tmp_path / "g16.tif")
    assert img.bit_depth == 16 and img.is_gray
    assert (img.rgb[0] - t[0]).abs().max() <= 0.5 / 65535 + 1e-7


def test_jpeg_quality_orders_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode="bicubic")
    t = (smooth[0] + 0.1 * torch.rand(3, 64, 64, generator=g)).clamp(0, 1)
    err = {}
    for q in (30, 95):
        write_image(tmp_path / f"q{q}.jpg", t, quality=q)
        err[q] = (read_image(tmp_path / f"q{q}.jpg") - t).abs().mean().item()
    assert err[95] < err[30]
    assert err[95] < 0.02
    assert (tmp_path / "q95.jpg").stat().st_size > (tmp_path / "q30.jpg").stat().st_size


@pytest.mark.parametrize("suffix", [".tif", ".bmp", ".webp"])
def test_lossless_formats_exact(tmp_path, suffix):
    a = rand_u8(seed=3)
    t = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    write_image(tmp_path / f"x{suffix}", t, quality=100)  # webp: quality 100 means lossless
    np.testing.assert_array_equal(to_u8(read_image(tmp_path / f"x{suffix}")), a)


def test_write_clamps_and_rounds(tmp_path):
    t = torch.tensor([[[-0.5, 1.5, float("nan"), 0.5 / 255 + 1e-4, 0.5 / 255 - 1e-4]]]).expand(3, 1, 5)
    write_image(tmp_path / "c.png", t)
    assert np.asarray(Image.open(tmp_path / "c.png"))[0, :, 0].tolist() == [0, 255, 0, 1, 0]


# ------------------------------------------------------------------------------------------- modes

def test_grayscale_file(tmp_path):
    a = rand_u8(c=1)
    Image.fromarray(a).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.is_gray and img.bit_depth == 8 and img.rgb.shape == (3, 12, 17)
    assert torch.equal(img.rgb[0], img.rgb[1]) and torch.equal(img.rgb[1], img.rgb[2])
    np.testing.assert_array_equal(to_u8(img.rgb)[..., 0], a)
    write_image(tmp_path / "g_out.png", img.rgb.mean(0, keepdim=True))  # gray written back as gray
    out = Image.open(tmp_path / "g_out.png")
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), a)


def test_bilevel_file(tmp_path):
    Image.fromarray(rand_u8(c=1) > 128).save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    assert img.is_gray and set(torch.unique(img.rgb).tolist()) <= {0.0, 1.0}


def test_palette_file(tmp_path):
    rgb = Image.fromarray(rand_u8(seed=4))
    pal = rgb.quantize(16)
    pal.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert not img.is_gray and img.alpha is None
    np.testing.assert_array_equal(to_u8(img.rgb), np.asarray(pal.convert("RGB")))


def test_palette_transparency_gives_alpha(tmp_path):
    pal = Image.fromarray(rand_u8(seed=5)).quantize(8)
    pal.save(tmp_path / "pt.png", transparency=0)
    img = load_image(tmp_path / "pt.png")
    assert img.alpha is not None
    expected = np.asarray(pal)[None] != 0
    np.testing.assert_array_equal(img.alpha.numpy() > 0.5, expected)


def test_rgba_file_and_alpha_recombined(tmp_path):
    a = rand_u8(c=4, seed=6)
    Image.fromarray(a).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.alpha is not None and img.alpha.shape == (1, 12, 17)
    np.testing.assert_array_equal(to_u8(img.rgb), a[..., :3])  # not composited
    np.testing.assert_array_equal(to_u8(img.alpha)[..., 0], a[..., 3])
    write_image(tmp_path / "b.png", img.rgb, alpha=img.alpha)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out), a)


def test_gray_alpha_file(tmp_path):
    a = rand_u8(c=2, seed=7)
    Image.fromarray(a).save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.is_gray and img.alpha is not None
    np.testing.assert_array_equal(to_u8(img.rgb)[..., 0], a[..., 0])
    np.testing.assert_array_equal(to_u8(img.alpha)[..., 0], a[..., 1])


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk_file(tmp_path, suffix):
    cmyk = Image.fromarray(rand_u8(seed=8)).convert("CMYK")
    cmyk.save(tmp_path / f"c{suffix}", **({"quality": 100} if suffix == ".jpg" else {}))
    img = load_image(tmp_path / f"c{suffix}")
    with Image.open(tmp_path / f"c{suffix}") as ref:
        assert ref.mode == "CMYK"
        expected = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(to_u8(img.rgb), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    base = Image.fromarray(rand_u8(5, 8, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    base.save(tmp_path / "o.png", exif=exif)
    img = load_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as ref:
        expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
    assert img.rgb.shape[1:] == ((8, 5) if orientation >= 5 else (5, 8))
    np.testing.assert_array_equal(to_u8(img.rgb), expected)


def test_set14_reads(data_dir):
    folder = data_dir / "val" / "Set14"
    baboon = load_image(folder / "baboon.png")
    assert baboon.rgb.shape == (3, 480, 500) and not baboon.is_gray
    bridge = load_image(folder / "bridge.png")  # a grayscale file in Set14
    assert bridge.is_gray and torch.equal(bridge.rgb[0], bridge.rgb[2])
    files, skipped = list_images(folder)
    assert len(files) == 14 and not skipped and files[0].name == "baboon.png"


# ------------------------------------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file") as e:
        load_image(tmp_path / "nope.png")
    one_line_error(e, "nope.png")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as e:
        load_image(tmp_path / "empty.png")
    one_line_error(e, "empty.png")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    Image.fromarray(rand_u8(64, 64, seed=9)).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(tmp_path / f"cut{suffix}")
    one_line_error(e, f"cut{suffix}")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(tmp_path / "notes.png")
    one_line_error(e, "notes.png")


def test_pixel_limit_checked_from_header(tmp_path, monkeypatch):
    Image.fromarray(rand_u8(10, 10)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the limit") as e:
        load_image(tmp_path / "big.png", max_pixels=99)
    one_line_error(e, "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=100).rgb.shape == (3, 10, 10)
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "50")
    with pytest.raises(ImageError, match="BLINDSR_MAX_PIXELS"):
        read_image(tmp_path / "big.png")
    # the check happens before decoding: tiny files whose headers claim huge sizes (no real pixel data)
    monkeypatch.delenv("BLINDSR_MAX_PIXELS")
    for side, message in ((9000, "81.0 megapixels is over the limit"), (100000, "over the limit")):
        (tmp_path / "bomb.png").write_bytes(png_header_only(side, side))
        with pytest.raises(ImageError, match=message):
            load_image(tmp_path / "bomb.png")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG claiming w x h pixels whose IDAT holds a few bytes: decoding it would fail, the header check not."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + images._png_chunk(b"IHDR", ihdr)
            + images._png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + images._png_chunk(b"IEND", b""))


def test_unsupported_mode(tmp_path):
    Image.new("LAB", (4, 4)).save(tmp_path / "lab.tif")
    with pytest.raises(ImageError, match="unsupported image mode") as e:
        load_image(tmp_path / "lab.tif")
    one_line_error(e, "lab.tif")


def test_float_tiff_range(tmp_path):
    Image.fromarray(np.full((3, 3), 0.25, np.float32)).save(tmp_path / "f.tif")
    assert torch.allclose(read_image(tmp_path / "f.tif"), torch.full((3, 3, 3), 0.25))
    Image.fromarray(np.full((3, 3), 7.0, np.float32)).save(tmp_path / "f7.tif")
    with pytest.raises(ImageError, match="outside"):
        load_image(tmp_path / "f7.tif")


# ------------------------------------------------------------------------------------------- writing rules

def _leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_unknown_suffix(tmp_path):
    with pytest.raises(ImageError, match="unknown image suffix") as e:
        write_image(tmp_path / "x.xyz", torch.zeros(3, 2, 2))
    one_line_error(e, "x.xyz")


def test_refuses_existing_output_unless_overwrite(tmp_path):
    p = write_image(tmp_path / "o.png", torch.zeros(3, 2, 2))
    with pytest.raises(ImageError, match="--overwrite"):
        write_image(p, torch.ones(3, 2, 2))
    assert read_image(p).max() == 0  # untouched
    write_image(p, torch.ones(3, 2, 2), overwrite=True)
    assert read_image(p).min() == 1
    assert _leftovers(tmp_path) == []


def test_refuses_to_overwrite_an_input(tmp_path):
    src = write_image(tmp_path / "in.png", torch.zeros(3, 2, 2))
    (tmp_path / "sub").mkdir()
    for spelled in (src, tmp_path / "sub" / ".." / "in.png"):
        with pytest.raises(ImageError, match="over an input"):
            write_image(spelled, torch.ones(3, 2, 2), overwrite=True, inputs=[src])
    assert read_image(src).max() == 0


def test_creates_parent_folders_and_leaves_no_temp(tmp_path):
    p = write_image(tmp_path / "a" / "b" / "o.webp", torch.rand(3, 5, 5))
    assert p.is_file() and _leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["o.webp"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(images, "_publish", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "o.png", torch.zeros(3, 2, 2))
    assert os.listdir(tmp_path) == []


def test_format_restrictions(tmp_path):
    with pytest.raises(ImageError, match="alpha"):
        write_image(tmp_path / "a.jpg", torch.zeros(4, 2, 2))
    with pytest.raises(ImageError, match="16-bit"):
        write_image(tmp_path / "a.jpg", torch.zeros(3, 2, 2), bit_depth=16)
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "a.png", torch.zeros(5, 2, 2))
    assert _leftovers(tmp_path) == [] and not (tmp_path / "a.jpg").exists()


def test_atomic_text_and_bytes(tmp_path):
    with atomic_write(tmp_path / "r" / "m.json", "w") as f:
        json.dump({"psnr": 30.5}, f)
    assert json.loads((tmp_path / "r" / "m.json").read_text()) == {"psnr": 30.5}
    write_bytes_atomic(tmp_path / "b.bin", b"abc")
    with pytest.raises(BlindSRError, match="--overwrite"):
        write_bytes_atomic(tmp_path / "b.bin", b"xyz", overwrite=False)
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "c.txt", "w") as f:
        f.write("partial")
        raise RuntimeError("crash midway")
    assert not (tmp_path / "c.txt").exists() and _leftovers(tmp_path) == []
    assert oct((tmp_path / "b.bin").stat().st_mode & 0o777) != oct(0o600)  # normal permissions


# ------------------------------------------------------------------------------------------- folders

def test_list_images_folder(tmp_path):
    for name in ("b10.png", "b2.png", "a.jpg"):
        Image.fromarray(rand_u8(4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.png").write_text("not a png")
    Image.fromarray(rand_u8(4, 4)).save(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rand_u8(4, 4)).save(tmp_path / "sub" / "c.png")
    with pytest.warns(UserWarning, match="skipped 2 non-image"):
        files, skipped = list_images(tmp_path)
    assert [f.name for f in files] == ["a.jpg", "b2.png", "b10.png"]
    assert sorted(f.name for f in skipped) == ["fake.png", "notes.txt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, _ = list_images([tmp_path], recursive=True)
    assert [str(f.relative_to(tmp_path)) for f in files] == ["a.jpg", "b2.png", "b10.png", "sub/c.png"]
    # explicit files keep their order, duplicates are dropped
    files, skipped = list_images([tmp_path / "b2.png", tmp_path / "a.jpg", tmp_path / "b2.png"])
    assert [f.name for f in files] == ["b2.png", "a.jpg"] and skipped == []
    with pytest.raises(ImageError, match="no such file") as e:
        list_images([tmp_path / "a.jpg", tmp_path / "gone"])
    one_line_error(e, "gone")


def test_natural_key():
    names = ["img10.png", "img2.png", "Img1.png", "img2b.png"]
    assert sorted(names, key=natural_key) == ["Img1.png", "img2.png", "img2b.png", "img10.png"]


def test_output_path_for(tmp_path):
    root = tmp_path / "in"
    (root / "x" / "y").mkdir(parents=True)
    out = tmp_path / "out"
    assert output_path_for(root / "x" / "y" / "a.jpg", root, out) == out / "x" / "y" / "a.png"
    assert output_path_for(root / "a.jpg", None, out) == out / "a.png"
    assert output_path_for(tmp_path / "elsewhere.jpg", root, out, suffix=None) == out / "elsewhere.jpg"
