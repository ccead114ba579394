"""Paired LR/HR folders (real or pre-made LR images): aligned random crops, the same flips on both.

Files pair up by their path relative to their folder without the suffix (``lr/sub/a.jpg`` <-> ``hr/sub/a.png``);
an LR name may also carry the DIV2K scale suffix (``lr/0001x4.png`` <-> ``hr/0001.png``). Item ``(epoch, index)``
draws its crop and flips from a generator seeded with ``(seed, epoch, index)``, like
:class:`~blindsr.data.datasets.HRFolderDataset`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blindsr.data.datasets import (
    ImageStore,
    crop_position,
    dihedral,
    list_hr_files,
    mix_seed,
    random_transform,
    split_key,
    to_float,
)
from blindsr.errors import BlindSRError


def _names(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def _by_key(files: list[Path], root: Path) -> dict[str, Path]:
    """Files keyed by their relative path without suffix; two files with one key are a user error."""
    keyed: dict[str, Path] = {}
    for f in files:
        key = f.relative_to(root).with_suffix("").as_posix()
        if key in keyed:
            raise BlindSRError(f"data: {keyed[key]} and {f} have the same name: keep one of them")
        keyed[key] = f
    return keyed


def pair_files(lr_root: str | Path, hr_root: str | Path, scale: int) -> list[tuple[Path, Path]]:
    """(LR file, HR file) pairs in the LR folder's order; every file must have exactly one partner."""
    lr_root, hr_root = Path(lr_root), Path(hr_root)
    lr, hr = _by_key(list_hr_files(lr_root), lr_root), _by_key(list_hr_files(hr_root), hr_root)
    pairs: list[tuple[Path, Path]] = []
    partner_of: dict[str, Path] = {}  # HR key -> its LR file
    no_hr: list[str] = []
    for key, f in lr.items():
        hr_key = key if key in hr else key.removesuffix(f"x{scale}")
        if hr_key not in hr:
            no_hr.append(f.relative_to(lr_root).as_posix())
        elif hr_key in partner_of:
            raise BlindSRError(f"data: {partner_of[hr_key]} and {f} both pair with {hr[hr_key]}: keep one of them")
        else:
            partner_of[hr_key] = f
            pairs.append((f, hr[hr_key]))
    no_lr = [f.relative_to(hr_root).as_posix() for k, f in hr.items() if k not in partner_of]
    if no_hr or no_lr:
        parts = [f"{len(no_hr)} LR image(s) without an HR partner in {hr_root} ({_names(no_hr)})"] if no_hr else []
        parts += [f"{len(no_lr)} HR image(s) without an LR partner in {lr_root} ({_names(no_lr)})"] if no_lr else []
        raise BlindSRError(f"data: the LR and HR folders do not pair up: {'; '.join(parts)}")
    return pairs


class PairedFolderDataset(torch.utils.data.Dataset):
    """Aligned random crops of LR/HR pairs: ``{"lr": (3, crop/scale, crop/scale), "hr": (3, crop, crop)}``.

    ``crop`` is in HR pixels (a multiple of ``scale``). The LR crop is drawn at a random position of the LR
    image and the HR crop is the same region (``scale`` x the position); both get the same dihedral transform.
    Each HR image must be exactly ``scale`` x its LR image, and the LR image at least ``crop/scale`` on each
    side; with ``cache`` (decode all images once) this is checked here, else when a pair is first read.
    Items are addressed as ``dataset[(epoch, index)]`` (``dataset[index]`` means epoch 0).
    """

    def __init__(self, lr_root: str | Path, hr_root: str | Path, scale: int = 4, crop: int = 128,
                 flip: bool = True, rot: bool = True, cache: bool = True, seed: int = 0):
        if crop % scale:
            raise BlindSRError(f"data.crop = {crop} must be a multiple of the scale {scale}")
        self.pairs = pair_files(lr_root, hr_root, scale)
        self.scale, self.crop, self.flip, self.rot, self.seed = scale, crop, flip, rot, seed
        self.lr = ImageStore([lr for lr, _ in self.pairs], cache)
        self.hr = ImageStore([hr for _, hr in self.pairs], cache)
        if cache:
            for i in range(len(self)):
                self.pair(i)

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (LR, HR) images ``index`` as uint8, checked for size."""
        lr, hr = self.lr[index], self.hr[index]
        (h, w), s, lc = lr.shape[-2:], self.scale, self.crop // self.scale
        if hr.shape[-2:] != (h * s, w * s):
            raise BlindSRError(f"data: {self.pairs[index][1]} is {hr.shape[-1]}x{hr.shape[-2]}, but its LR "
                               f"{self.pairs[index][0]} is {w}x{h} (x{s} = {w * s}x{h * s})")
        if min(h, w) < lc:
            raise BlindSRError(f"data: {self.pairs[index][0]} is {w}x{h}, smaller than the LR crop {lc} "
                               f"(data.crop {self.crop} / scale {s}): use a smaller crop")
        return lr, hr

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key)
        lr, hr = self.pair(index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        s, lc = self.scale, self.crop // self.scale
        top, left = crop_position(lr.shape[-2], lr.shape[-1], lc, g)
        lr = lr[..., top:top + lc, left:left + lc]
        hr = hr[..., top * s:(top + lc) * s, left * s:(left + lc) * s]
        transform = random_transform(g, self.flip, self.rot)
        return {"lr": to_float(dihedral(lr, *transform)), "hr": to_float(dihedral(hr, *transform))}
