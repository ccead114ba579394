"""Datasets: HR folders (reproducible crops/flips, correct augmentation), paired LR/HR folders (aligned crops,
pairing, errors), unpaired LR/HR (independent, seeded), resumable sharded sampling, hold-out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.data import PairedFolderDataset, UnpairedDataset
from blindsr.data.datasets import (
    FixedLRSet,
    HRFolderDataset,
    StreamSampler,
    dihedral,
    make_loader,
    pad_to,
    split_holdout,
)
from blindsr.errors import BlindSRError

TRANSFORMS = [(h, v, t) for h in (0, 1) for v in (0, 1) for t in (0, 1)]


def _write(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture()
def folder(tmp_path) -> Path:
    for i, (h, w) in enumerate([(40, 52), (37, 45), (48, 48), (33, 60)]):
        _write(tmp_path / f"img{i}.png", h, w, seed=i)
    return tmp_path


def _locate(patch: torch.Tensor, img: torch.Tensor) -> list[tuple]:
    """All (transform, top, left) such that dihedral(img crop at top/left, transform) == patch."""
    size = patch.shape[-1]
    found = []
    for tr in TRANSFORMS:
        for top in range(img.shape[-2] - size + 1):
            for left in range(img.shape[-1] - size + 1):
                crop = img[..., top:top + size, left:left + size]
                if torch.equal(dihedral(crop, *map(bool, tr)), patch):
                    found.append((tr, top, left))
    return found


def test_items_are_reproducible_and_vary_with_epoch_and_seed(folder):
    ds = HRFolderDataset(folder, crop=16, scale=4, seed=3)
    a, b = ds[(2, 1)], HRFolderDataset(folder, crop=16, scale=4, seed=3, cache=False)[(2, 1)]
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)  # cache or not, same item
    assert torch.equal(ds[1], ds[(0, 1)])
    assert not torch.equal(ds[(2, 1)], ds[(3, 1)])
    assert not torch.equal(ds[(2, 1)], HRFolderDataset(folder, crop=16, scale=4, seed=4)[(2, 1)])


def test_augmentation_is_a_dihedral_transform_of_a_crop(folder):
    ds = HRFolderDataset(folder, crop=8, scale=4, seed=0)
    img = ds.image(1)  # 37 x 45, random content: a match is unique
    seen = set()
    for epoch in range(24):
        patch = (ds[(epoch, 1)] * 255).round().to(torch.uint8)
        found = _locate(patch, img)
        assert len(found) == 1, found
        seen.add(found[0][0])
    assert len(seen) >= 7  # the 8 transforms all occur (24 draws: allow one to be missed by chance)
    plain = HRFolderDataset(folder, crop=8, scale=4, flip=False, rot=False)
    for epoch in range(6):
        patch = (plain[(epoch, 1)] * 255).round().to(torch.uint8)
        assert [f[0] for f in _locate(patch, img)] == [(0, 0, 0)]


def test_small_images_are_reflect_padded(tmp_path):
    arr = _write(tmp_path / "small.png", 10, 12, seed=0)
    ds = HRFolderDataset(tmp_path, crop=16, scale=4, flip=False, rot=False)
    out = (ds[0] * 255).round().to(torch.uint8)
    img = torch.from_numpy(arr).permute(2, 0, 1)
    assert out.shape == (3, 16, 16)
    assert torch.equal(out[:, :10, :12], img)
    assert torch.equal(out[:, 10, :12], img[:, 8])  # reflect (edge not repeated)
    assert torch.equal(out[:, :10, 12], img[:, :, 10])
    assert pad_to(torch.zeros(3, 1, 2, dtype=torch.uint8), 8).shape == (3, 8, 8)


def test_crop_must_be_a_multiple_of_scale(folder):
    with pytest.raises(BlindSRError, match="multiple"):
        HRFolderDataset(folder, crop=30, scale=4)


def test_sampler_covers_epochs_shards_and_resumes():
    s = StreamSampler(n=10, batch_size=4, seed=1)
    stream = [k for b in range(5) for k in s.batch(b)]  # 20 items = 2 epochs
    for e in (0, 1):
        assert sorted(i for ep, i in stream if ep == e) == list(range(10))
    assert [i for _, i in stream[:10]] != [i for _, i in stream[10:]]  # reshuffled per epoch
    r0, r1 = StreamSampler(10, 2, seed=1, rank=0, world=2), StreamSampler(10, 2, seed=1, rank=1, world=2)
    assert [k for b in range(5) for k in r0.batch(b) + r1.batch(b)] == stream
    it = iter(StreamSampler(10, 4, seed=1, start_batch=3))
    assert next(it) == s.batch(3) and next(it) == s.batch(4)


def test_loader_is_independent_of_workers(folder):
    ds = HRFolderDataset(folder, crop=8, scale=4, seed=0)
    take = lambda loader: [b for _, b in zip(range(3), loader, strict=False)]  # noqa: E731
    a, b = take(make_loader(ds, 3, seed=0, workers=0)), take(make_loader(ds, 3, seed=0, workers=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[0].shape == (3, 3, 8, 8)
    resumed = take(make_loader(ds, 3, seed=0, start_batch=2))
    assert torch.equal(resumed[0], a[2])


def test_holdout_split(folder):
    files = sorted(folder.glob("*.png"))
    train, held = split_holdout(files, val_names=["img2", "img0.png"])
    assert [f.name for f in held] == ["img0.png", "img2.png"] and len(train) == 2
    assert not set(train) & set(held)
    t1, h1 = split_holdout(files, val_fraction=0.25, seed=5)
    assert len(h1) == 1 and (t1, h1) == split_holdout(files, val_fraction=0.25, seed=5)
    with pytest.raises(BlindSRError, match="img9"):
        split_holdout(files, val_names=["img9"])
    with pytest.raises(BlindSRError, match="no training images"):
        split_holdout(files, val_names=[f.stem for f in files])


def test_fixed_lr_set_is_fixed(folder):
    def degrade(hr, generator):  # a stand-in degradation: average-pool x4 + seeded noise
        lr = torch.nn.functional.avg_pool2d(hr, 4)
        return SimpleNamespace(lr=lr + 0.01 * torch.randn(lr.shape, generator=generator), hr=hr)

    files = sorted(folder.glob("*.png"))
    a = FixedLRSet(files, degrade, scale=4, crop=32, seed=0, max_images=3)
    b = FixedLRSet(files, degrade, scale=4, crop=32, seed=0, max_images=3)
    assert len(a) == 3
    for (na, lra, hra), (nb, lrb, hrb) in zip(a, b, strict=True):
        assert na == nb and torch.equal(lra, lrb) and torch.equal(hra, hrb)
        assert hra.shape[-2] % 4 == 0 and hra.shape[-1] % 4 == 0 and max(hra.shape[-2:]) <= 32
        assert lra.shape[-2:] == (hra.shape[-2] // 4, hra.shape[-1] // 4)
    assert not torch.equal(a.pairs[0][0], a.pairs[1][0][..., :a.pairs[0][0].shape[-2], :a.pairs[0][0].shape[-1]])


def _box_lr(hr: np.ndarray, s: int) -> np.ndarray:
    """Exact box downsampling (mean of each s x s block), rounded to uint8."""
    h, w, c = hr.shape
    return hr.reshape(h // s, s, w // s, s, c).mean((1, 3)).round().astype(np.uint8)


@pytest.fixture()
def pairs(tmp_path) -> tuple[Path, Path]:
    """hr/ and lr/ (box x4): a.png <-> a.png, sub/b.png <-> sub/b.png, c.png <-> cx4.png (DIV2K naming)."""
    (tmp_path / "hr" / "sub").mkdir(parents=True)
    (tmp_path / "lr" / "sub").mkdir(parents=True)
    for i, (name, lr_name, h, w) in enumerate([("a", "a", 48, 64), ("sub/b", "sub/b", 64, 40), ("c", "cx4", 40, 40)]):
        hr = _write(tmp_path / "hr" / f"{name}.png", h, w, seed=10 + i)
        Image.fromarray(_box_lr(hr, 4)).save(tmp_path / "lr" / f"{lr_name}.png")
    return tmp_path / "lr", tmp_path / "hr"


def test_paired_crops_are_aligned_and_share_the_transform(pairs):
    ds = PairedFolderDataset(*pairs, scale=4, crop=16, seed=0)
    assert [(lr.name, hr.name) for lr, hr in ds.pairs] == [("a.png", "a.png"), ("cx4.png", "c.png"), ("b.png", "b.png")]
    seen = set()
    for epoch in range(12):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            lr, hr = item["lr"], item["hr"]
            assert lr.shape == (3, 4, 4) and hr.shape == (3, 16, 16) and lr.dtype == hr.dtype == torch.float32
            down = torch.nn.functional.avg_pool2d(hr[None] * 255, 4)[0].round()
            assert torch.equal(down, (lr * 255).round())  # box-downsampled HR crop == LR crop, under any flip
            found = _locate((lr * 255).round().to(torch.uint8), ds.lr[i])
            assert len(found) == 1
            seen.add(found[0])
    assert len(seen) >= 12  # positions and transforms vary


def test_paired_items_are_seeded_by_key(pairs):
    a, b = PairedFolderDataset(*pairs, crop=16, seed=1), PairedFolderDataset(*pairs, crop=16, seed=1, cache=False)
    assert all(torch.equal(a[(3, 1)][k], b[(3, 1)][k]) for k in ("lr", "hr"))
    assert torch.equal(a[1]["hr"], a[(0, 1)]["hr"])
    assert not torch.equal(a[(3, 1)]["hr"], a[(4, 1)]["hr"])
    assert not torch.equal(a[(3, 1)]["hr"], PairedFolderDataset(*pairs, crop=16, seed=2)[(3, 1)]["hr"])
    batch = next(iter(make_loader(a, 2, seed=0)))
    assert batch["lr"].shape == (2, 3, 4, 4) and batch["hr"].shape == (2, 3, 16, 16)


def test_paired_errors_are_one_line(pairs, tmp_path):
    lr_root, hr_root = pairs
    for n in range(4):
        _write(lr_root / f"extra{n}.png", 8, 8, seed=n)
    with pytest.raises(BlindSRError, match=r"4 LR image\(s\) without an HR partner .*\(extra0.png, extra1.png, "
                                           r"extra2.png, \.\.\.\)") as e:
        PairedFolderDataset(lr_root, hr_root, crop=16)
    assert "\n" not in str(e.value)
    for n in range(4):
        (lr_root / f"extra{n}.png").unlink()
    (lr_root / "sub" / "b.png").unlink()
    with pytest.raises(BlindSRError, match=r"1 HR image\(s\) without an LR partner .*\(sub/b.png\)"):
        PairedFolderDataset(lr_root, hr_root, crop=16)
    _write(lr_root / "sub" / "b.png", 16, 11, seed=0)  # HR is 40 x 64: LR should be 10 x 16
    with pytest.raises(BlindSRError, match="b.png is 40x64, but its LR .*b.png is 11x16"):
        PairedFolderDataset(lr_root, hr_root, crop=16)
    lazy = PairedFolderDataset(lr_root, hr_root, crop=16, cache=False)  # checked when the pair is read
    with pytest.raises(BlindSRError, match="40x64"):
        lazy[2]
    with pytest.raises(BlindSRError, match="smaller than the LR crop 16"):
        PairedFolderDataset(lr_root, hr_root, crop=64, cache=False)[0]
    with pytest.raises(BlindSRError, match="multiple of the scale"):
        PairedFolderDataset(lr_root, hr_root, crop=18)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BlindSRError, match="no images"):
        PairedFolderDataset(tmp_path / "empty", hr_root)


def test_unpaired_hr_is_independent_of_lr_and_seeded(folder, tmp_path):
    lr_files = sorted(folder.glob("*.png"))
    other = tmp_path / "other"
    other.mkdir()
    other_lr = [other / f"o{i}.png" for i in range(len(lr_files))]
    for i, f in enumerate(other_lr):
        _write(f, 20, 20, seed=100 + i)
    hr_root = tmp_path / "hr"
    hr_root.mkdir()
    for j in range(5):  # HR image j has its pixels in [50 j, 50 j + 40]: a crop tells which image it came from
        arr = np.random.default_rng(j).integers(50 * j, 50 * j + 41, (30, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(hr_root / f"h{j}.png")
    ds = UnpairedDataset(lr_files, hr_root, lr_crop=8, hr_crop=16, seed=0)
    assert len(ds) == 4
    twin = UnpairedDataset(other_lr, hr_root, lr_crop=8, hr_crop=16, seed=0, cache=False)
    used = []
    for epoch in range(6):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            assert item["lr"].shape == (3, 8, 8) and item["hr"].shape == (3, 16, 16)
            assert torch.equal(item["hr"], twin[(epoch, i)]["hr"])  # the HR side ignores the LR images
            hr = (item["hr"] * 255).round().to(torch.uint8)
            used.append(int(hr.min()) // 50)
            assert int(hr.max()) // 50 == used[-1]
            if epoch == 0:
                assert len(_locate((item["lr"] * 255).round().to(torch.uint8), ds.lr[i])) == 1  # LR i, cropped
    assert set(used) == set(range(5)) and used[:4] != used[4:8]  # random HR images, redrawn every epoch
    assert torch.equal(ds[(2, 3)]["lr"], ds[(2, 3)]["lr"]) and not torch.equal(ds[(2, 3)]["hr"], ds[(3, 3)]["hr"])
    assert not torch.equal(ds[(2, 3)]["hr"], UnpairedDataset(lr_files, hr_root, 8, 16, seed=1)[(2, 3)]["hr"])
