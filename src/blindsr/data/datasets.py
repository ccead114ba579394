"""Training data: HR-only random crops (the LR is synthesised by the loss), shared helpers, resumable sampling.

The LR image is *not* made here for :class:`HRFolderDataset`: the trainer's loss function degrades the HR batch
on the accelerator device (as the official BlindDiff code does in ``feed_data``), so the dataset only yields HR
crops. Datasets with real LR images (:mod:`blindsr.data.paired`, :mod:`blindsr.data.unpaired`) build on the
helpers here.

Reproducibility: item ``(epoch, index)`` draws its crop and flips from a generator seeded with
``hash(seed, epoch, index)``, and :class:`StreamSampler` orders items by a per-epoch permutation seeded with
``hash(seed, epoch)``. Nothing depends on worker count or on what came before, so a resumed run sees exactly the
batches it would have seen. Every dataset here keeps that contract: an item depends only on (seed, epoch, index).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from blindsr.errors import BlindSRError


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def list_hr_files(root: str | Path) -> list[Path]:
    """The image files under ``root`` (recursive, sorted); a user error when there are none."""
    from blindsr.io.images import list_images

    if not Path(root).is_dir():
        raise BlindSRError(f"data root {root}: no such folder")
    files, _ = list_images([Path(root)], recursive=True)
    if not files:
        raise BlindSRError(f"data root {root}: no images found")
    return [Path(f) for f in files]


def resolve_files(root: str | Path | Sequence[Path]) -> list[Path]:
    """A folder (its images, recursive) or an explicit file list; a user error when there are none."""
    files = list_hr_files(root) if isinstance(root, str | Path) else [Path(f) for f in root]
    if not files:
        raise BlindSRError("data: no training images")
    return files


def split_holdout(files: Sequence[Path], val_fraction: float = 0.0, val_names: Sequence[str] = (),
                  seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into (train, held-out). ``val_names`` (names or stems) win over ``val_fraction``.

    The fractional split is a seeded permutation of the sorted list, so it is the same on every run.
    """
    files = sorted(Path(f) for f in files)
    if val_names:
        wanted = set(val_names)
        held = [f for f in files if f.name in wanted or f.stem in wanted]
        found = {f.name for f in held} | {f.stem for f in held}
        missing = sorted(n for n in wanted if n not in found)
        if missing:
            raise BlindSRError(f"data.val_names: not in the data folder: {', '.join(missing)}")
    elif val_fraction > 0:
        if not 0 < val_fraction < 1:
            raise BlindSRError(f"data.val_fraction = {val_fraction}: must be in [0, 1)")
        n = max(1, round(val_fraction * len(files)))
        g = torch.Generator().manual_seed(mix_seed(seed, "holdout"))
        pick = set(torch.randperm(len(files), generator=g)[:n].tolist())
        held = [f for i, f in enumerate(files) if i in pick]
    else:
        held = []
    train = [f for f in files if f not in set(held)]
    if not train:
        raise BlindSRError("data: the hold-out split leaves no training images")
    return train, held


def load_uint8(path: Path) -> torch.Tensor:
    """Read an image as a (3,H,W) uint8 tensor (the in-memory cache format: 4x smaller than float)."""
    from blindsr.io.images import read_image

    return read_image(path).clamp(0, 1).mul(255).round().to(torch.uint8)


class ImageStore:
    """The images of ``files`` as uint8 (3,H,W): decoded once here when ``cache``, else at every access."""

    def __init__(self, files: Sequence[Path], cache: bool = True):
        self.files = list(files)
        self._cache = [load_uint8(f) for f in self.files] if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._cache[index] if self._cache is not None else load_uint8(self.files[index])


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 -> contiguous float32 in [0, 1]."""
    return img.float().div_(255).contiguous()


def pad_to(img: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad (bottom/right) until both sides are at least ``size``; repeated for very small images."""
    x = img[None].float()
    while x.shape[-2] < size or x.shape[-1] < size:
        ph, pw = max(size - x.shape[-2], 0), max(size - x.shape[-1], 0)
        if min(x.shape[-2:]) == 1:  # nothing to reflect
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        else:  # reflect padding must be smaller than the side
            x = F.pad(x, (0, min(pw, x.shape[-1] - 1), 0, min(ph, x.shape[-2] - 1)), mode="reflect")
    return x[0].to(img.dtype)


def random_crop(img: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` crop at a uniformly random position (padding small images first)."""
    img = pad_to(img, size)
    top, left = crop_position(img.shape[-2], img.shape[-1], size, generator)
    return img[..., top:top + size, left:left + size]


def crop_position(h: int, w: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly random ``size`` crop of an h x w image (``size`` <= h, w)."""
    top = int(torch.randint(0, h - size + 1, (), generator=generator))
    left = int(torch.randint(0, w - size + 1, (), generator=generator))
    return top, left


def dihedral(img: torch.Tensor, hflip: bool, vflip: bool, transpose: bool) -> torch.Tensor:
    """BasicSR ``augment`` order: horizontal flip, vertical flip, then transpose (rot90 + flip)."""
    if hflip:
        img = img.flip(-1)
    if vflip:
        img = img.flip(-2)
    if transpose:
        img = img.transpose(-2, -1)
    return img


def random_transform(generator: torch.Generator, flip: bool = True, rot: bool = True) -> tuple[bool, bool, bool]:
    """The :func:`dihedral` flags: hflip (if ``flip``), vflip and transpose (if ``rot``), each with probability 1/2."""
    bits = torch.rand(3, generator=generator) < 0.5  # always draw 3 numbers: the stream does not depend on flags
    return flip and bool(bits[0]), rot and bool(bits[1]), rot and bool(bits[2])


def random_dihedral(img: torch.Tensor, generator: torch.Generator, flip: bool = True,
                    rot: bool = True) -> torch.Tensor:
    """``img`` under a :func:`random_transform`."""
    return dihedral(img, *random_transform(generator, flip, rot))


def random_patch(img: torch.Tensor, size: int, generator: torch.Generator, flip: bool = True,
                 rot: bool = True) -> torch.Tensor:
    """A :func:`random_crop` of the uint8 ``img`` under a :func:`random_dihedral`, as float in [0, 1]."""
    return to_float(random_dihedral(random_crop(img, size, generator), generator, flip, rot))


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """A dataset key as (epoch, index): ``(epoch, index)`` as is, a bare ``index`` means epoch 0."""
    return key if isinstance(key, tuple) else (0, key)


class HRFolderDataset(torch.utils.data.Dataset):
    """Random HR crops from a folder of images (or an explicit file list).

    Items are addressed as ``dataset[(epoch, index)]`` (``dataset[index]`` means epoch 0); the random crop
    and flips come from a generator seeded with ``(seed, epoch, index)``. Returns a float (3, crop, crop)
    tensor in [0, 1]. Images smaller than the crop are reflect-padded (not skipped), so a folder of any
    sizes works.
    """

    def __init__(self, root: str | Path | Sequence[Path], crop: int = 128, flip: bool = True, rot: bool = True,
                 scale: int = 4, cache: bool = True, seed: int = 0):
        if crop % scale:
            raise BlindSRError(f"data.crop = {crop} must be a multiple of the scale {scale}")
        self.files = resolve_files(root)
        self.crop, self.flip, self.rot, self.scale, self.seed = crop, flip, rot, scale, seed
        self.images = ImageStore(self.files, cache)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        """The full image ``index`` as uint8 (3,H,W)."""
        return self.images[index]

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        epoch, index = split_key(key)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        return random_patch(self.image(index), self.crop, g, self.flip, self.rot)


class StreamSampler(torch.utils.data.Sampler):
    """An endless, resumable batch sampler over ``(epoch, index)`` keys, sharded over processes.

    Global micro-batch ``b`` holds stream items ``[b*B*P, (b+1)*B*P)`` (B = per-process batch, P = processes);
    process ``rank`` takes its B consecutive items. Stream item ``q`` is ``perm_{q // n}[q % n]`` with
    ``perm_e`` a permutation seeded with ``(seed, e)``. Batches may straddle epochs (no sample is dropped).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 start_batch: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start_batch = rank, world, start_batch
        self._perm: tuple[int, list[int]] = (-1, [])

    def key(self, q: int) -> tuple[int, int]:
        epoch, i = divmod(q, self.n)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, "perm", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return epoch, self._perm[1][i]

    def batch(self, b: int) -> list[tuple[int, int]]:
        first = (b * self.world + self.rank) * self.batch_size
        return [self.key(q) for q in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        while True:
            yield self.batch(b)
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return math.ceil(self.n / self.batch_size) if self.n else 0


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, seed: int = 0, rank: int = 0,
                world: int = 1, start_batch: int = 0, workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """An endless DataLoader over ``dataset`` that starts at micro-batch ``start_batch`` (for resume)."""
    sampler = StreamSampler(len(dataset), batch_size, seed, rank, world, start_batch)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False)


def centre_crop(img: torch.Tensor, size: int | None, multiple: int = 1) -> torch.Tensor:
    """Centre crop to ``size`` (if smaller than the image) and trim to a multiple of ``multiple`` (modcrop)."""
    h, w = img.shape[-2:]
    th, tw = (min(h, size), min(w, size)) if size else (h, w)
    th, tw = th - th % multiple, tw - tw % multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return img[..., top:top + th, left:left + tw]


class FixedLRSet:
    """Validation pairs with a fixed LR: each HR is degraded once, with a generator seeded by ``(seed, i)``.

    ``degrade`` follows the degradation contract ``degrade(hr (1,3,H,W), generator) -> result.lr/.hr``.
    The pairs are made once in ``__init__`` on the CPU and never change during training.
    """

    def __init__(self, files: Sequence[Path], degrade, scale: int = 4, crop: int | None = 128, seed: int = 0,
                 max_images: int | None = None):
        files = list(files)[:max_images] if max_images else list(files)
        self.names: list[str] = []
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, f in enumerate(files):
            hr = centre_crop(load_uint8(Path(f)).float().div(255), crop, multiple=scale)
            res = degrade(hr[None], torch.Generator().manual_seed(mix_seed(seed, "val", i)))
            self.names.append(Path(f).stem)
            self.pairs.append((res.lr[0].clamp(0, 1), res.hr[0]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name, (lr, hr) in zip(self.names, self.pairs, strict=True):
            yield name, lr, hr
