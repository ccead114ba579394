"""UDDM's report measures: the patch SWD and the PCA -> t-SNE picture."""

from __future__ import annotations

import torch

from blindsr.methods.uddm import report as R


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_patch_swd_is_zero_for_the_same_images_and_grows_with_noise():
    imgs = [torch.rand(3, 24, 32, generator=gen(i)).mul(0.2).add(0.4) for i in range(4)]
    noisy = [(x + 0.05 * torch.randn(x.shape, generator=gen(9 + i))).clamp(0, 1) for i, x in enumerate(imgs)]
    noisier = [(x + 0.15 * torch.randn(x.shape, generator=gen(19 + i))).clamp(0, 1) for i, x in enumerate(imgs)]
    a = R.patches(imgs, 8, 64, gen(1))
    assert a.shape == (256, 192) and torch.allclose(a.mean(1), torch.zeros(256), atol=1e-6)  # mean-removed
    same = R.sliced_wasserstein(a, R.patches(imgs, 8, 64, gen(1)), generator=gen(2))
    d1 = R.sliced_wasserstein(a, R.patches(noisy, 8, 64, gen(3)), generator=gen(2))
    d2 = R.sliced_wasserstein(a, R.patches(noisier, 8, 64, gen(3)), generator=gen(2))
    assert same == 0.0 and 0 < d1 < d2


def test_tsne_keeps_two_clusters_apart(tmp_path):
    a = torch.randn(60, 20, generator=gen(4))
    b = torch.randn(60, 20, generator=gen(5)) + 6.0
    y = R.tsne(R.pca(torch.cat([a, b]), 10), iters=300, generator=gen(6))
    ya, yb = y[:60], y[60:]
    within = (torch.cdist(ya, ya).mean() + torch.cdist(yb, yb).mean()) / 2
    assert torch.cdist(ya, yb).mean() > 2 * within
    path = R.scatter_png({"real": ya, "synthetic": yb}, tmp_path / "p.png", title="t")
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (640, 640)
