"""blindsr.io.visual: contact-sheet geometry and content, kernel pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blindsr.errors import ImageError
from blindsr.io.images import read_image
from blindsr.io.visual import (
    GAP,
    LABEL_BG,
    LABEL_HEIGHT,
    colormap,
    contact_grid,
    contact_sheet,
    kernel_image,
    save_kernel,
)


def quantised(*shape, seed=0):
    """Random image with values k/255, so 8-bit conversions inside the sheet are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def gaussian(size=21, sigma=2.0):
    r = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def test_contact_sheet_size_and_panels(tmp_path):
    lr, sr, hr = quantised(3, 8, 8), quantised(3, 32, 32, seed=1), quantised(3, 32, 48, seed=2)
    sheet = contact_sheet([lr, sr, hr], ["LR", "SR x4", "HR"], tmp_path / "s.png")
    assert sheet.shape == (3, LABEL_HEIGHT + 32, 32 + 32 + 48 + 2 * GAP)
    body = sheet[:, LABEL_HEIGHT:]
    # enlarged panels use nearest: each LR pixel is a visible 4x4 block
    assert torch.equal(body[:, :, :32], lr.repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert torch.equal(body[:, :, 32 + GAP:64 + GAP], sr)
    assert torch.equal(body[:, :, 64 + 2 * GAP:], hr)
    assert torch.equal(body[:, :, 32:32 + GAP], torch.ones(3, 32, GAP))  # white gap
    # the label strip is the label colour with some light text pixels on it
    strip = sheet[:, :LABEL_HEIGHT, :32]
    bg = torch.tensor(LABEL_BG, dtype=torch.float32)[:, None, None] / 255
    assert (strip == bg).all(0).float().mean() > 0.7
    assert (strip.mean(0) > 0.6).any()
    assert torch.allclose(read_image(tmp_path / "s.png"), sheet)  # the file is the returned picture


def test_contact_sheet_height_and_no_labels():
    big = quantised(3, 64, 96)
    sheet = contact_sheet([big, quantised(1, 16, 16)], None, height=32)
    assert sheet.shape == (3, 32, 48 + 32 + GAP)  # shrunk (bicubic) and grown (nearest) to 32
    assert torch.equal(sheet[0, :, 48 + GAP:], sheet[2, :, 48 + GAP:])  # gray panel stays gray


def test_contact_sheet_refuses_existing(tmp_path):
    img = quantised(3, 4, 4)
    contact_sheet([img], ["a"], tmp_path / "s.png")
    with pytest.raises(ImageError, match="--overwrite"):
        contact_sheet([img], ["a"], tmp_path / "s.png")
    contact_sheet([img], ["b"], tmp_path / "s.png", overwrite=True)


def test_contact_sheet_label_count_checked():
    with pytest.raises(ValueError, match="labels"):
        contact_sheet([quantised(3, 4, 4)], ["a", "b"])


def test_contact_grid_shape():
    rows = [[quantised(3, 8, 8), quantised(3, 16, 16)], [quantised(3, 16, 8)]]
    grid = contact_grid(rows, [["lr", "sr"], ["x"]], height=16)
    row1_w = 16 + 16 + GAP
    assert grid.shape == (3, 2 * (LABEL_HEIGHT + 16) + GAP, row1_w)
    assert torch.equal(grid[:, LABEL_HEIGHT + 16 + GAP:, 8:], torch.ones(3, LABEL_HEIGHT + 16, row1_w - 8))


def test_kernel_image_viridis():
    k = gaussian()
    img = kernel_image(k)
    assert img.shape == (3, 21 * 8, 21 * 8) and img.dtype == torch.float32
    centre, corner = img[:, 10 * 8 + 3, 10 * 8 + 3], img[:, 0, 0]
    assert torch.allclose(centre, torch.tensor([0.993, 0.906, 0.144]), atol=1e-6)  # the peak is yellow
    assert torch.allclose(corner, torch.tensor([0.267, 0.005, 0.329]), atol=1e-2)  # ~0 is dark purple
    assert torch.equal(img[:, :8, :8], corner[:, None, None].expand(3, 8, 8))  # one tap = one 8x8 block
    assert kernel_image(k.numpy(), size=64).shape == (3, 64, 64)
    assert kernel_image(torch.ones(3, 7), size=70).shape == (3, 30, 70)


def test_kernel_image_gray_normalised():
    k = gaussian(11, 1.5) * 0.01
    img = kernel_image(k, cmap="gray", scale=1)
    assert torch.equal(img[0], img[1]) and img.max() == 1.0
    assert torch.allclose(img[0].double(), (k / k.max()).float().double(), atol=1e-6)


def test_viridis_luminance_increases():
    ramp = torch.linspace(0, 1, 101)[None]
    rgb = colormap(ramp, "viridis")[:, 0]
    luma = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    assert (luma.diff() > 0).all()
    with pytest.raises(ValueError, match="colormap"):
        colormap(ramp, "jet")


def test_save_kernel(tmp_path):
    k = gaussian(15, 2.5).float()
    png, npy = save_kernel(k, tmp_path / "k" / "kernel.png")
    assert png.is_file() and npy == tmp_path / "k" / "kernel.npy"
    np.testing.assert_array_equal(np.load(npy), k.numpy())
    assert read_image(png).shape == (3, 120, 120)
