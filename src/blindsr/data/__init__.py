"""Training data: HR folder datasets (LR is synthesised on the fly by the method's loss), resumable sampling."""

from blindsr.data.datasets import (
    FixedLRSet,
    HRFolderDataset,
    StreamSampler,
    make_loader,
    mix_seed,
    split_holdout,
)

__all__ = ["FixedLRSet", "HRFolderDataset", "StreamSampler", "make_loader", "mix_seed", "split_holdout"]
