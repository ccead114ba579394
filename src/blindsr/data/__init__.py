"""Training data: HR folders (LR synthesised on the fly by the method's loss), paired and unpaired LR/HR
folders, resumable seeded sampling (an item depends only on (seed, epoch, index))."""

from blindsr.data.datasets import (
    FixedLRSet,
    HRFolderDataset,
    StreamSampler,
    make_loader,
    mix_seed,
    split_holdout,
)
from blindsr.data.paired import PairedFolderDataset
from blindsr.data.unpaired import UnpairedDataset

__all__ = ["FixedLRSet", "HRFolderDataset", "PairedFolderDataset", "StreamSampler", "UnpairedDataset",
           "make_loader", "mix_seed", "split_holdout"]
