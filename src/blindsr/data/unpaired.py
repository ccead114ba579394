"""Unpaired LR and HR images (e.g. a camera's real LR photos and a folder of clean HR images): independent crops.

For learning a degradation (or a CycleGAN-style model) from images that are not pairs. Item ``(epoch, i)`` is a
crop of LR image ``i`` and a crop of an HR image drawn at random for that key, so the HR side is independent
of the LR side but still a function of ``(seed, epoch, i)`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from blindsr.data.datasets import ImageStore, mix_seed, random_patch, resolve_files, split_key


class UnpairedDataset(torch.utils.data.Dataset):
    """``{"lr": (3, lr_crop, lr_crop), "hr": (3, hr_crop, hr_crop)}`` floats in [0, 1]; length = #LR images.

    ``lr`` / ``hr``: a folder (recursive) or a list of files. Item ``(epoch, i)``: LR image ``i`` cropped and
    flipped with a generator seeded ``(seed, "lr", epoch, i)``; an HR image index, its crop and its flips drawn
    from a generator seeded ``(seed, "hr", epoch, i)``. Images smaller than a crop are reflect-padded.
    """

    def __init__(self, lr: str | Path | Sequence[Path], hr: str | Path | Sequence[Path], lr_crop: int = 32,
                 hr_crop: int = 128, flip: bool = True, rot: bool = True, cache: bool = True, seed: int = 0):
        self.lr, self.hr = ImageStore(resolve_files(lr), cache), ImageStore(resolve_files(hr), cache)
        self.lr_crop, self.hr_crop, self.flip, self.rot, self.seed = lr_crop, hr_crop, flip, rot, seed

    def __len__(self) -> int:
        return len(self.lr)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key)
        g_lr = torch.Generator().manual_seed(mix_seed(self.seed, "lr", epoch, index))
        g_hr = torch.Generator().manual_seed(mix_seed(self.seed, "hr", epoch, index))
        j = int(torch.randint(len(self.hr), (), generator=g_hr))
        return {"lr": random_patch(self.lr[index], self.lr_crop, g_lr, self.flip, self.rot),
                "hr": random_patch(self.hr[j], self.hr_crop, g_hr, self.flip, self.rot)}
