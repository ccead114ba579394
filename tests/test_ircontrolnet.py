"""IRControlNet: official layout, initialisation from the UNet, and how its controls enter the UNet."""

from __future__ import annotations

import ast

import pytest
import torch

from blindsr.errors import WeightsError
from blindsr.models import ircontrolnet as icn
from blindsr.models import sd

TINY_LDM = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_linear_in_transformer=True,
                transformer_depth=1, context_dim=32)  # the fixture's tiny config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = sd.unet_config_from_ldm(TINY_LDM)
    unet = sd.build_unet(cfg).eval()  # diffusers' default init: no zero convs, every path carries signal
    g = torch.Generator().manual_seed(1)
    inputs = dict(z_t=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([500, 20]),
                  c_img=torch.randn(2, 4, 8, 8, generator=g), c_txt=torch.randn(2, 77, 32, generator=g))
    return cfg, unet, inputs


def test_full_size_official_layout(reference_dir):
    config = icn.IRControlNetConfig.from_unet_config()
    assert config.num_controls() == 13
    with torch.device("meta"):
        net = icn.IRControlNet(config)
    assert sum(p.numel() for p in net.parameters()) == 363_153_280
    keys = {}
    for line in (reference_dir / "diffbir" / "controlnet.txt").read_text().splitlines():
        k, shape, _ = line.split("\t")
        keys[k] = torch.empty(ast.literal_eval(shape), device="meta")
    assert len(keys) == 324 and keys["input_blocks.0.0.weight"].shape == (320, 8, 3, 3)
    converted = icn.convert_official_controlnet(keys, config)
    own = net.state_dict()
    assert converted.keys() == own.keys() and all(converted[k].shape == own[k].shape for k in own)
    loaded = icn.load_official_controlnet(keys, config)
    assert loaded.conv_in.weight.shape == (320, 8, 3, 3)
    with pytest.raises(WeightsError, match="missing"):
        icn.load_official_controlnet({k: v for k, v in keys.items() if not k.startswith("zero_convs.11")}, config)
    with pytest.raises(WeightsError, match="unexpected"):
        icn.load_official_controlnet({**keys, "input_hint_block.0.weight": torch.empty(1)}, config)


def test_control_shapes_follow_the_unet_skips(tiny):
    cfg, unet, x = tiny
    net = icn.IRControlNet.from_unet(unet)
    controls = net(x["z_t"], x["t"], x["c_img"], x["c_txt"])
    # tiny: conv_in, level-0 layer, downsample, level-1 layer, middle block
    assert [tuple(c.shape[1:]) for c in controls] == [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 4, 4)]


def test_from_unet_copies_weights_and_starts_as_a_no_op(tiny):
    cfg, unet, x = tiny
    net = icn.IRControlNet.from_unet(unet)
    assert torch.equal(net.conv_in.weight[:, :4], unet.conv_in.weight)
    assert net.conv_in.weight[:, 4:].eq(0).all()  # the condition channels start at zero
    own, src = net.state_dict(), unet.state_dict()
    shared = [k for k in own if k in src and k != "conv_in.weight"]
    assert len(shared) > 50 and all(torch.equal(own[k], src[k]) for k in shared)
    assert all(p.eq(0).all() for n, p in net.named_parameters() if n.startswith("controlnet_"))
    with torch.no_grad():
        controls = net(x["z_t"], x["t"], x["c_img"], x["c_txt"])
        assert all(c.eq(0).all() for c in controls)
        plain = unet(x["z_t"], x["t"], encoder_hidden_states=x["c_txt"]).sample
        controlled = icn.ControlledUNet(unet, net)(x["z_t"], x["t"], x["c_txt"], x["c_img"])
    assert torch.allclose(plain, controlled, atol=1e-6)


def _official_style(unet, x, controls):
    """Official ``ControlledUnetModel`` semantics written with hooks: ``controls[-1]`` is added to the middle-block
    output and ``controls[i]`` to skip ``i`` only when the decoder consumes it (the encoder is not modulated)."""
    skips = list(controls[:-1])

    def add_mid(module, args, output):
        return output + controls[-1]

    def add_skips(module, args, kwargs):
        res = kwargs["res_hidden_states_tuple"]
        mine = skips[len(skips) - len(res):]
        del skips[len(skips) - len(res):]
        kwargs["res_hidden_states_tuple"] = tuple(r + c for r, c in zip(res, mine, strict=True))
        return args, kwargs

    hooks = [unet.mid_block.register_forward_hook(add_mid)]
    hooks += [b.register_forward_pre_hook(add_skips, with_kwargs=True) for b in unet.up_blocks]
    try:
        return unet(x["z_t"], x["t"], encoder_hidden_states=x["c_txt"]).sample
    finally:
        for h in hooks:
            h.remove()


def test_controls_are_added_to_the_skips_and_middle_output(tiny):
    cfg, unet, x = tiny
    g = torch.Generator().manual_seed(3)
    controls = [0.3 * torch.randn(2, *s, generator=g) for s in [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 4, 4)]]
    with torch.no_grad():
        ours = icn.controlled_unet(unet, x["z_t"], x["t"], x["c_txt"], controls)
        official = _official_style(unet, x, controls)
        plain = unet(x["z_t"], x["t"], encoder_hidden_states=x["c_txt"]).sample
        zero = icn.controlled_unet(unet, x["z_t"], x["t"], x["c_txt"], controls, 0.0)
    assert (ours - plain).abs().max() > 1e-3  # the controls matter
    assert torch.allclose(ours, official, atol=1e-5)
    assert torch.allclose(zero, plain, atol=1e-6)  # strength 0 = plain SD
    with pytest.raises(WeightsError, match="control scales"):
        icn.controlled_unet(unet, x["z_t"], x["t"], x["c_txt"], controls, [1.0, 1.0])


def test_per_control_scales_match_prescaled_controls(tiny):
    cfg, unet, x = tiny
    controls = [0.1 * torch.randn(2, *s, generator=torch.Generator().manual_seed(i))
                for i, s in enumerate([(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 4, 4)])]
    scales = [0.5, 1.0, 2.0, 0.0, 1.5]
    with torch.no_grad():
        a = icn.controlled_unet(unet, x["z_t"], x["t"], x["c_txt"], controls, scales)
        b = icn.controlled_unet(unet, x["z_t"], x["t"], x["c_txt"], [c * s for c, s in zip(controls, scales, strict=True)])
    assert torch.allclose(a, b, atol=1e-6)


def test_official_state_dict_with_or_without_prefix(reference_dir):
    ref = torch.load(reference_dir / "diffbir" / "tiny_cldm_ref_strong.pt", weights_only=True)
    config = icn.IRControlNetConfig.from_unet_config(sd.unet_config_from_ldm(ref["configs"]["unet"]))
    prefixed = {k: v for k, v in ref["cldm_state"].items() if k.startswith("controlnet.")}
    bare = {k[len("controlnet."):]: v for k, v in prefixed.items()}
    assert len(bare) == 138 and bare["input_blocks.0.0.weight"].shape[1] == 8
    a, b = icn.convert_official_controlnet(bare, config), icn.convert_official_controlnet(prefixed, config)
    assert a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    net = icn.load_official_controlnet(bare, config)
    assert torch.equal(net.controlnet_mid_block.weight, bare["middle_block_out.0.weight"])
    assert torch.equal(net.down_blocks[0].resnets[0].conv1.weight, bare["input_blocks.1.0.in_layers.2.weight"])
