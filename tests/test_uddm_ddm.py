"""UDDM's DDM, pixel backend (tiny UNet): the condition, Eq. 3 on an overfit run, seeded batch-independent
synthesis that depends on its condition, tiles."""

from __future__ import annotations

import pytest
import torch

from blindsr.degradations.operators import imresize
from blindsr.errors import BlindSRError
from blindsr.methods.prior.config import PriorUNetConfig
from blindsr.methods.prior.model import build_unet
from blindsr.methods.uddm import ddm as D


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**changes) -> D.DDMConfig:
    return D.DDMConfig(unet=D.ddm_unet_config(PriorUNetConfig.tiny()), **{"sample_steps": 4, "tile": 0, **changes})


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(tiny().unet).eval()


def test_condition_is_bicubic_down_then_back_to_the_target_size():
    lr = torch.rand(2, 3, 24, 32, generator=gen())
    c = D.condition(lr, 4)
    assert c.shape == lr.shape
    assert torch.allclose(c, imresize(imresize(lr, scale=0.25), size=(24, 32)).clamp(0, 1))
    hr = torch.rand(1, 3, 96, 128, generator=gen(1))  # synthesis: (HR ↓ r s) at the LR size HR / r
    c = D.condition(hr, 4 * 4, size=(24, 32))
    assert c.shape == (1, 3, 24, 32)
    assert torch.allclose(c, imresize(imresize(hr, scale=1 / 16), size=(24, 32)).clamp(0, 1))


def test_the_loss_falls_on_an_overfit_run():
    torch.manual_seed(0)
    cfg = tiny()
    net = build_unet(cfg.unet)
    diffusion = cfg.diffusion.process()
    lr = torch.rand(2, 3, 16, 16, generator=gen(2))
    cond = D.condition(lr, 4)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t = torch.tensor([300, 600])

    def fixed() -> float:
        with torch.no_grad():
            return D.ddm_loss(net, diffusion, lr, cond, gen(9), t).item()
    before = fixed()
    for i in range(40):
        opt.zero_grad()
        D.ddm_loss(net, diffusion, lr, cond, gen(i)).backward()
        opt.step()
    assert fixed() < 0.5 * before


def test_synthesis_is_seeded_batch_independent_and_follows_the_condition(unet):
    cfg = tiny()
    a, b = torch.rand(1, 3, 16, 24, generator=gen(3)), torch.rand(1, 3, 16, 24, generator=gen(4))
    one = D.synthesize(unet, cfg, a, [gen(0)])
    assert one.shape == (1, 3, 16, 24) and one.min() >= 0 and one.max() <= 1
    assert torch.equal(one, D.synthesize(unet, cfg, a, [gen(0)]))
    pair = D.synthesize(unet, cfg, torch.cat([b, a]), [gen(5), gen(0)])
    assert torch.allclose(pair[1:], one, atol=1e-5)  # image i depends on its own generator only
    assert (D.synthesize(unet, cfg, b, [gen(0)]) - one).abs().max() > 1e-3  # the condition path matters
    odd = D.synthesize(unet, cfg, torch.rand(1, 3, 13, 19, generator=gen(6)), [gen(0)])
    assert odd.shape == (1, 3, 13, 19)  # any size (padded to the UNet's levels inside, cropped back)


def test_tiled_synthesis_gives_each_tile_its_condition_crop():
    """With a pointwise stand-in UNet tiled == untiled exactly, so every tile saw its own crop."""
    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.3))
            self.config = tiny().unet  # null_context reads cross_attention_dim

        def forward(self, x, t, encoder_hidden_states):
            import types
            return types.SimpleNamespace(sample=self.w * x[:, :3] + 0.5 * x[:, 3:])

    net, cond = Pointwise(), torch.rand(1, 3, 32, 48, generator=gen(7))
    whole = D.synthesize(net, tiny(tile=0), cond, [gen(1)])
    tiles = D.synthesize(net, tiny(tile=16, overlap=8), cond, [gen(1)])
    assert torch.allclose(whole, tiles, atol=1e-5)


def test_config_errors():
    with pytest.raises(BlindSRError, match="6 channels"):
        D.DDMConfig(unet=PriorUNetConfig.tiny())
    with pytest.raises(BlindSRError, match="multiple"):
        tiny(tile=15)
    with pytest.raises(BlindSRError):
        tiny(s=0)
