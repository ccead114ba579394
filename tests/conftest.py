"""Shared test fixtures: paths to the shared data and reference fixtures beside the checkout.

A clone without ``../shared`` (a user's) still passes: tests that need the official-code fixtures or the shared
images are skipped with one reason line naming ``BLINDSR_SHARED``. CI has ``../shared`` and must run everything:
``.ci/run`` sets ``BLINDSR_REQUIRE_SHARED=1``, which turns such a skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BLINDSR_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("BLINDSR_REQUIRE_SHARED", "") not in ("", "0")

# One intra-op thread for the whole suite: the tests use tiny tensors, where OpenMP start-up and barriers
# cost more than the work. On a lightly loaded 2-core machine 1 thread is a little faster (sr + blinddiff
# tests: 6.9 s vs 7.7 s); on a busy one 2 threads are pathological, every parallel region waiting for a
# descheduled thread (whole suite: 37 s vs 6 min). Test files that pin 1 thread themselves agree with this.
torch.set_num_threads(1)


def _need(path: Path, what: str) -> Path:
    """``path`` if it exists; else skip (fail under BLINDSR_REQUIRE_SHARED) with one reason line."""
    if not path.is_dir():
        msg = f"needs {what} at {path} (set BLINDSR_SHARED to the shared folder)"
        if REQUIRE_SHARED:
            pytest.fail(f"BLINDSR_REQUIRE_SHARED is set but the test {msg}")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "the shared data and fixtures")


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    return _need(shared_dir / "data", "the shared images")


@pytest.fixture(scope="session")
def reference_dir(shared_dir) -> Path:
    return _need(shared_dir / "reference", "the official-code conformance fixtures")


@pytest.fixture()
def make_hr_folder(tmp_path):
    """``make_hr_folder(n, h, w)``: a folder ``tmp_path/hr`` of ``n`` seeded random RGB PNGs of h x w (training data)."""
    import numpy as np
    from PIL import Image

    def make(n: int, h: int, w: int) -> Path:
        root = tmp_path / "hr"
        root.mkdir()
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        return root

    return make


@pytest.fixture(scope="session")
def tiny_dmsr_checkpoint(tmp_path_factory) -> Path:
    """A DM-SR checkpoint (pixel backend, random tiny E_θ / T) on a tiny random prior file beside it."""
    from blindsr.methods.dmsr import pipeline as dp
    from blindsr.methods.dmsr.nets import EncoderConfig, EstimatorConfig, TimeAwareEncoder, TimestepEstimator
    from blindsr.methods.prior.config import PriorUNetConfig
    from blindsr.methods.prior.model import Prior, build_unet, save_prior

    tmp_path = tmp_path_factory.mktemp("dmsr")
    torch.manual_seed(0)
    cfg = PriorUNetConfig.tiny()
    prior = save_prior(Prior(build_unet(cfg), cfg), tmp_path / "tiny_prior.safetensors")
    enc = TimeAwareEncoder(EncoderConfig(**{**EncoderConfig.pixel_s().__dict__, "block_out_channels": (8, 8, 8, 8),
                                            "norm_num_groups": 4, "t_embed_dim": 16}))
    pipe = dp.DMSRPipeline(TimestepEstimator(EstimatorConfig(width_mult=0.0625)).eval(), enc.eval(),
                           dp.pixel_prior(str(prior)))
    return dp.save_pipeline(pipe, tmp_path / "tiny_dmsr.safetensors", "pixel", prior=str(prior))
