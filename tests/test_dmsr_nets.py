"""DM-SR's trainable networks: timestep estimator T, time-aware encoder E_θ, LR discriminator D (tiny configs)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.dmsr.nets import (
    DiscriminatorConfig,
    EncoderConfig,
    EstimatorConfig,
    LRDiscriminator,
    TimeAwareEncoder,
    TimestepEstimator,
    d_loss,
    expected_timestep,
    g_loss,
    vgg19_conv_indices,
)
from blindsr.models.sd import load_config

# torchvision's vgg19().features: the convs' module indices (hard-coded: torchvision is not a dependency)
TORCHVISION_VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TORCHVISION_VGG19_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
SD_VAE_ENCODER_PARAMS = 34_163_592  # diffusers AutoencoderKL(SD 2.x).encoder, counted (the paper: 34.16 M)

TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- T ----------------------------------------------------------------------------------------------------
def test_t_hat_formula_and_range():
    torch.manual_seed(0)
    est = TimestepEstimator(EstimatorConfig(width_mult=0.0625, n_bins=500))
    lr = torch.rand(3, 3, 20, 28, generator=seeded())
    t_hat, logits = est(lr)
    assert t_hat.shape == (3,) and logits.shape == (3, 500) and t_hat.dtype == torch.float32
    assert ((t_hat >= 0) & (t_hat <= 499)).all()
    torch.testing.assert_close(t_hat, (logits.softmax(-1) * torch.arange(500.0)).sum(-1))
    # extreme logits stay in range
    big = torch.randn(4, 500, generator=seeded(1)) * 1e4
    t = expected_timestep(big)
    assert ((t >= 0) & (t <= 499)).all()
    # a one-hot spike at bin 123
    with torch.no_grad():
        est.head.weight.zero_()
        est.head.bias.fill_(-1e4)
        est.head.bias[123] = 0.0
    assert est(lr)[0].tolist() == [123.0] * 3


def test_t_hat_gradient_reaches_vgg():
    torch.manual_seed(0)
    est = TimestepEstimator(EstimatorConfig(width_mult=0.0625, n_bins=50))
    t_hat, _ = est(torch.rand(2, 3, 32, 32, generator=seeded()))
    t_hat.sum().backward()
    first, last = est.features[0].weight.grad, est.features[34].weight.grad
    assert first is not None and first.abs().sum() > 0 and last.abs().sum() > 0


def test_vgg19_keys_match_torchvision_and_load_strictly():
    assert vgg19_conv_indices() == TORCHVISION_VGG19_CONVS
    with torch.device("meta"):
        est = TimestepEstimator()
    expected = {f"features.{i}.{p}" for i in TORCHVISION_VGG19_CONVS for p in ("weight", "bias")}
    assert {f"features.{k}" for k in est.features.state_dict()} == expected
    assert len(est.features) == 37  # indices 0..36: 16 convs + 16 ReLUs + 5 pools
    sd, c_in = {}, 3
    for i, c in zip(TORCHVISION_VGG19_CONVS, TORCHVISION_VGG19_WIDTHS, strict=True):
        sd[f"features.{i}.weight"] = torch.full((c, c_in, 3, 3), i / 100)
        sd[f"features.{i}.bias"] = torch.full((c,), -i / 100)
        c_in = c
    sd.update({"classifier.0.weight": torch.zeros(2, 3), "classifier.6.bias": torch.zeros(1000)})  # ignored
    with torch.device("meta"):  # no init cost: the loaded tensors are assigned
        est = TimestepEstimator()
    est.load_vgg19_features(sd)
    assert est.features[34].weight.eq(0.34).all() and est.features[5].bias.eq(-0.05).all()
    with pytest.raises(WeightsError, match="missing"):
        est.load_vgg19_features({k: v for k, v in sd.items() if k != "features.34.bias"})
    with pytest.raises(WeightsError, match="unexpected"):
        est.load_vgg19_features({**sd, "head.weight": torch.zeros(1)})
    with pytest.raises(WeightsError):
        TimestepEstimator(EstimatorConfig(width_mult=0.5)).load_vgg19_features(sd)


# ---- E_θ --------------------------------------------------------------------------------------------------
def test_encoder_full_size_parameter_count():
    with torch.device("meta"):
        enc = TimeAwareEncoder(EncoderConfig.sd())
        vae = AutoencoderKL(**load_config("vae"))  # SD 2.x: 128/256/512/512, 4 x DownEncoderBlock2D, latent 4
    d = EncoderConfig.sd().t_embed_dim
    linears = sum(d * c + c for c in (128, 256, 512, 512))
    print(f"SD VAE encoder {n_params(vae.encoder):,} + quant_conv {n_params(vae.quant_conv)} "
          f"+ t̂ linears {linears:,} = E_θ {n_params(enc):,}")
    assert n_params(vae.encoder) == SD_VAE_ENCODER_PARAMS
    assert n_params(enc) == n_params(vae.encoder) + n_params(vae.quant_conv) + linears == 34_345_296
    assert EncoderConfig.from_vae_config() == EncoderConfig.sd()


def _tiny_pair(seed: int = 0) -> tuple[AutoencoderKL, TimeAwareEncoder]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE).eval()
    enc = TimeAwareEncoder(EncoderConfig.from_vae_config(TINY_VAE, t_embed_dim=16)).eval()
    enc.load_sd_vae_encoder(vae.state_dict())
    return vae, enc


def test_encoder_loads_vae_and_equals_it_at_init():
    vae, enc = _tiny_pair()
    x = torch.rand(2, 3, 16, 24, generator=seeded())
    with torch.no_grad():
        ref = vae.encode(2 * x - 1).latent_dist.mean * vae.config.scaling_factor
        for t_hat in (torch.tensor([0.0, 499.0]), 123.4, torch.tensor([7.25, 250.5])):
            assert torch.equal(enc(x, t_hat), ref)
    assert ref.shape == (2, 4, 8, 12)
    with torch.no_grad():
        enc.t_levels[1].weight.normal_(generator=seeded(2))
        a, b = enc(x, torch.tensor([10.0, 10.0])), enc(x, torch.tensor([10.5, 10.0]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])


def test_encoder_load_is_strict():
    vae, enc = _tiny_pair()
    sd = vae.state_dict()
    with pytest.raises(WeightsError, match="missing"):
        enc.load_sd_vae_encoder({k: v for k, v in sd.items() if k != "encoder.conv_in.bias"})
    with pytest.raises(WeightsError, match="unexpected"):
        enc.load_sd_vae_encoder({**sd, "something.else": torch.zeros(1)})
    with pytest.raises(WeightsError, match="size"):  # a VAE with other widths: shape mismatches
        other = AutoencoderKL(**{**TINY_VAE, "block_out_channels": (16, 32)})
        enc.load_sd_vae_encoder(other.state_dict())


def test_encoder_gradients_and_mlp_option():
    torch.manual_seed(0)
    enc = TimeAwareEncoder(EncoderConfig.from_vae_config(TINY_VAE, t_embed_dim=16, t_mlp_dim=32))
    enc.gradient_checkpointing = True
    out = enc(torch.rand(1, 3, 16, 16, generator=seeded()), torch.tensor([42.0]))
    out.square().mean().backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in enc.t_levels)  # zero-init projections still learn
    assert enc.encoder.conv_in.weight.grad.abs().sum() > 0


def test_pixel_encoder_keeps_the_size():
    torch.manual_seed(0)
    cfg = EncoderConfig.pixel_s()
    enc = TimeAwareEncoder(cfg)
    assert enc.quant_conv is None and all(b.downsamplers is None for b in enc.encoder.down_blocks)
    assert cfg.multiple == 1 and cfg.scaling_factor == 1.0
    x = torch.rand(2, 3, 20, 28, generator=seeded())
    out = enc(x, torch.tensor([3.5, 480.0]))
    assert out.shape == x.shape


def test_encoder_config_errors():
    with pytest.raises(BlindSRError):
        EncoderConfig(block_out_channels=(30, 64), norm_num_groups=8)
    with pytest.raises(BlindSRError):
        EncoderConfig(t_embed_dim=7)


# ---- D ----------------------------------------------------------------------------------------------------
def test_discriminator_is_lr_conditioned():
    torch.manual_seed(0)
    disc = LRDiscriminator(DiscriminatorConfig.tiny(in_channels=4))
    z = torch.randn(3, 4, 16, 16, generator=seeded(), requires_grad=True)
    lr = torch.rand(3, 3, 32, 32, generator=seeded(1))  # bigger than z: the LR is shrunk to z's size
    logits = disc(z, lr)
    assert logits.shape == (3,)
    other = disc(z, torch.rand(3, 3, 32, 32, generator=seeded(2)))
    assert (logits - other).abs().min() > 1e-6
    logits.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_discriminator_pixel_backend_and_full_size():
    torch.manual_seed(0)
    disc = LRDiscriminator(DiscriminatorConfig.tiny(in_channels=3))
    assert disc(torch.rand(2, 3, 40, 56), torch.rand(2, 3, 10, 14)).shape == (2,)  # the LR upsampled x4
    with torch.device("meta"):
        full = LRDiscriminator()
    assert [lvl[0].conv1.out_channels for lvl in full.levels] == [64, 128, 256, 256]
    print(f"LRDiscriminator (SD latent): {n_params(full):,} parameters")


def test_gan_losses_on_hand_made_logits():
    r, f = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - r) = [0, .5, 2] -> 5/6; relu(1 + f) = [0, 1, 2] -> 1
    torch.testing.assert_close(d_loss(r, f, "hinge"), torch.tensor(5 / 6 + 1))
    torch.testing.assert_close(g_loss(f, "hinge"), torch.tensor(1 / 3))
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(d_loss(r, f, "bce"), sp(-r).mean() + sp(f).mean())
    torch.testing.assert_close(d_loss(torch.zeros(2), torch.zeros(2), "bce"), torch.tensor(2 * 0.6931471805599453))
    torch.testing.assert_close(g_loss(f, "bce"), -torch.log(torch.sigmoid(f)).mean())
    assert d_loss(r, f) == d_loss(r, f, "hinge")
    with pytest.raises(BlindSRError):
        g_loss(f, "wgan")
