"""MCFormer (BlindDiff denoiser): conformance to the official code, key layout, loading, variants, precision."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
import torch

from blindsr.config import to_dict
from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.mcformer import MCFormer, MCFormerConfig, count_parameters, infer_config, load_official

FULL_PARAMS = 26_509_267


@pytest.fixture(scope="module")
def ref(reference_dir):
    return torch.load(reference_dir / "blinddiff" / "tiny_ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(ref) -> MCFormer:
    model = MCFormer(MCFormerConfig.from_official(ref["config"])).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    return model


def _record_intermediates(model: MCFormer) -> tuple[dict[str, torch.Tensor], list]:
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda mod, inp, out: acts.__setitem__(name, out)

    mods = {"t_embed": model.t_embedder, "k_feat": model.k_mlp, "patch_embed": model.patch_embed,
            "output_conv": model.output}
    for stage in ("encoder_level1", "encoder_level2", "encoder_level3", "latent", "decoder_level3",
                  "decoder_level2", "decoder_level1", "refinement"):
        mods[f"{stage}_out"] = getattr(model, stage)[-1]
    return acts, [m.register_forward_hook(keep(n)) for n, m in mods.items()]


# ---- 1. conformance to the official forward (fixture made with lifengcs/BlindDiff @ 828a992) -----------------------
def test_tiny_fixture_fp32_and_intermediates(ref, tiny):
    acts, hooks = _record_intermediates(tiny)
    with torch.no_grad():
        out, kernel = tiny(ref["x_t"], ref["t"], ref["cond"])
    for h in hooks:
        h.remove()
    assert out.shape == (2, 6, 64, 64) and kernel.shape == (2, 441)
    assert (out - ref["out"]).abs().max() <= 1e-5  # measured 2.4e-7
    assert (kernel - ref["kernel"]).abs().max() <= 1e-6  # measured 3.0e-8
    inter = ref["intermediates"]
    assert torch.equal(acts["t_embed"], inter["t_embed"])  # sin-first encoding, bit-exact
    for name in ("k_feat", "patch_embed", "encoder_level1_out", "encoder_level3_out", "latent_out",
                 "decoder_level1_out", "refinement_out", "output_conv"):
        assert (acts[name] - inter[name]).abs().max() <= 2e-6, name
    cond_up = torch.nn.functional.interpolate(ref["cond"], scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.equal(cond_up, inter["cond_up"])
    assert torch.allclose(kernel.sum(1), torch.ones(2), atol=1e-6)


def test_tiny_fixture_fp64(ref):
    model = MCFormer(MCFormerConfig.from_official(ref["config"])).double().eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out, kernel = model(ref["x_t"].double(), ref["t"].double(), ref["cond"].double())
    assert out.dtype == torch.float64
    assert (out - ref["out_fp64"]).abs().max() <= 1e-10  # measured 5.6e-16
    assert (kernel - ref["kernel_fp64"]).abs().max() <= 1e-10  # measured 1.4e-16


def test_timestep_forms_and_batch_one(ref, tiny):
    with torch.no_grad():
        out_f, k_f = tiny(ref["x_t"], ref["t"].float(), ref["cond"])
        out_1, k_1 = tiny(ref["x_t"][1:], 503, ref["cond"][1:])
        out_swap, _ = tiny(ref["x_t"], torch.tensor([500, 20]), ref["cond"])
    assert torch.equal(out_f, tiny(ref["x_t"], ref["t"], ref["cond"])[0])  # int and float t identical
    assert out_1.shape == (1, 6, 64, 64) and k_1.shape == (1, 441)  # batch dim kept at B=1
    assert (out_1 - ref["out"][1:]).abs().max() <= 1e-5
    assert (out_swap - ref["out"]).abs().max() > 1e-3  # the time embedding matters


def test_input_size_errors(tiny):
    with pytest.raises(BlindSRError, match="divisible by 8.*60x64"):
        tiny(torch.zeros(1, 3, 60, 64), torch.tensor([1]), torch.zeros(1, 3, 15, 16))
    with pytest.raises(BlindSRError, match="cond must be"):
        tiny(torch.zeros(1, 3, 64, 64), torch.tensor([1]), torch.zeros(1, 3, 32, 32))


# ---- 2. full official layout --------------------------------------------------------------------------------------
def test_full_config_keys_and_param_count(reference_dir):
    with torch.device("meta"):
        model = MCFormer(MCFormerConfig.full())
    assert count_parameters(model) == FULL_PARAMS
    lines = (reference_dir / "blinddiff" / "keys_full.txt").read_text().splitlines()
    expected = [tuple(line.split("\t")[:2]) for line in lines]
    mine = [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]
    assert len(mine) == 448
    assert mine == expected


def test_config_dict_roundtrip_and_official_names(ref):
    full = MCFormerConfig.full()
    assert MCFormerConfig.from_official(json.loads(json.dumps(to_dict(full)))) == full
    tiny = MCFormerConfig.from_official(ref["config"])  # official kwarg names (inp_channels, LayerNorm_type, ...)
    assert tiny == MCFormerConfig.tiny() and tiny.learn_sigma
    shipped = json.loads(resources.files("blindsr").joinpath("configs/mcformer_full.json").read_text())
    assert MCFormerConfig.from_official(shipped) == full
    with pytest.raises(BlindSRError, match="unknown key"):
        MCFormerConfig.from_official({"dimm": 4})
    with pytest.raises(BlindSRError, match="dual_pixel_task"):
        MCFormerConfig.from_official({"dual_pixel_task": True})


# ---- 3./4. loading -----------------------------------------------------------------------------------------------
def test_load_official_basicsr_checkpoint_infers_config(ref, tmp_path):
    sd = ref["state_dict"]
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # 'params' must lose to 'params_ema'
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": decoy, "params_ema": sd}, path)
    model = load_official(path)
    assert model.config == MCFormerConfig.tiny()
    with torch.no_grad():
        out, kernel = model(ref["x_t"], ref["t"], ref["cond"])
    assert (out - ref["out"]).abs().max() <= 1e-5 and (kernel - ref["kernel"]).abs().max() <= 1e-6
    assert infer_config(sd) == MCFormerConfig.tiny()


def test_infer_config_full_on_meta():
    with torch.device("meta"):
        sd = MCFormer(MCFormerConfig.full(layernorm_type="BiasFree", ffn_expansion_factor=2.0)).state_dict()
        assert infer_config(sd) == MCFormerConfig.full(layernorm_type="BiasFree", ffn_expansion_factor=2.0)
        sd = MCFormer(MCFormerConfig.small(variant="paper")).state_dict()
        assert infer_config(sd) == MCFormerConfig.small(variant="paper")


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_load_official_bad_state_dict_is_one_line_weights_error(ref, damage):
    sd = dict(ref["state_dict"])
    if damage == "missing":
        del sd["encoder_level2.0.attn.qkv.weight"]
    else:
        sd["k_mlp.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError) as info:
        load_official(sd, config=MCFormerConfig.tiny())
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError):
        load_official({"foo": torch.zeros(1)})  # cannot infer a config


# ---- 5. paper variant (4 convs, PCA code) ---------------------------------------------------------------------------
def _gaussian_kernels(n: int, size: int = 21, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sx, sy = (0.6 + 4.4 * torch.rand(2, n, generator=g)).unbind(0)
    theta = math.pi * (2 * torch.rand(n, generator=g) - 1)
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = torch.exp(-0.5 * (u**2 / sx[:, None, None] ** 2 + v**2 / sy[:, None, None] ** 2))
    return (k / k.sum((1, 2), keepdim=True)).reshape(n, -1)


def test_paper_variant_shapes_and_pca_decode():
    kernels = _gaussian_kernels(400)
    mean = kernels.mean(0)
    basis = torch.linalg.svd((kernels - mean).T, full_matrices=False)[0][:, :10]  # (441, 10)
    cfg = MCFormerConfig.tiny(variant="paper")
    torch.manual_seed(0)
    model = MCFormer(cfg, pca_basis=basis.float(), pca_mean=mean.float()).eval()
    # tiny paper: 853,441 params (full paper config: 26,352,164; buffers not counted)
    assert count_parameters(model) == 853_441
    assert "pca_basis" in model.state_dict() and "predictor.9.weight" in model.state_dict()
    x_t, cond = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out, code = model(x_t, torch.tensor([3, 900]), cond)
    assert out.shape == (2, 6, 32, 32) and code.shape == (2, 10)
    decoded = model.kernel_from_output(code)
    assert decoded.shape == (2, 21, 21)
    assert torch.allclose(decoded.sum((1, 2)), torch.ones(2), atol=1e-5)  # components sum to 0, mean to 1
    true = kernels[:4].float()
    recon = model.decode_kernel((true - mean.float()) @ basis.float())
    assert (recon.reshape(4, -1) - true).abs().max() < 0.1 * true.max()
    with pytest.raises(BlindSRError, match="PCA basis is not set"):
        MCFormer(cfg).decode_kernel(code)
    with pytest.raises(BlindSRError, match="shape"):
        MCFormer(cfg, pca_basis=torch.zeros(441, 9))


def test_official_kernel_from_output_is_row_major(ref, tiny):
    k = tiny.kernel_from_output(ref["kernel"])
    assert k.shape == (2, 21, 21) and torch.equal(k[1, 3, 5], ref["kernel"][1, 3 * 21 + 5])


# ---- 6. reduced precision -----------------------------------------------------------------------------------------
def test_bf16_autocast_and_bf16_weights(ref, tiny):
    x_t, t, cond = ref["x_t"][:1, :, :16, :16], ref["t"][:1], ref["cond"][:1, :, :4, :4]
    with torch.no_grad():
        out32, k32 = tiny(x_t, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ac, k_ac = tiny(x_t, t, cond)
        bf16 = MCFormer(tiny.config).to(torch.bfloat16).eval()
        bf16.load_state_dict(tiny.state_dict())
        out_bf, k_bf = bf16(x_t.bfloat16(), t, cond.bfloat16())
    assert k_ac.dtype == torch.float32 and k_bf.dtype == torch.float32  # kernel softmax in fp32
    assert out_bf.dtype == torch.bfloat16
    for out, k, tol in ((out_ac, k_ac, 0.05), (out_bf.float(), k_bf, 0.1)):
        assert torch.isfinite(out).all()
        assert (out - out32).abs().max() < tol
        assert (k - k32).abs().max() < 0.01
        assert torch.allclose(k.sum(1), torch.ones(1), atol=1e-5)


def test_gradient_checkpointing_same_gradients(ref):
    model = MCFormer(MCFormerConfig.tiny())
    model.load_state_dict(ref["state_dict"])
    x_t, t, cond = ref["x_t"][:1, :, :8, :8], ref["t"][:1], ref["cond"][:1, :, :2, :2]
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        out, kernel = model(x_t, t, cond)
        (out.square().mean() + kernel.square().sum()).backward()
        grads.append(model.encoder_level1[0].modulation[1].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- 7. "w/o modulation" ablation -----------------------------------------------------------------------------------
def test_modulation_off_full_layout_and_inference():
    with torch.device("meta"):
        full = MCFormer(MCFormerConfig.full()).state_dict()
        model = MCFormer(MCFormerConfig.full(modulation=False))
    sd = model.state_dict()
    # exactly the official keys minus the block modulation Linears and the t/k embedding MLPs
    dropped = [k for k in full if ".modulation." in k or k.startswith(("t_embedder.", "k_mlp."))]
    assert list(sd) == [k for k in full if k not in dropped] and len(dropped) == 2 * 32 + 8  # 32 blocks
    assert count_parameters(model) == 25_206_355  # 26,509,267 - 1,260,672 (modulation) - 42,240 (t/k MLPs)
    assert infer_config(sd) == MCFormerConfig.full(modulation=False)
    assert to_dict(MCFormerConfig.full())["modulation"] is True


# ---- 8. compiled blocks (`blindsr sr --compile`) ------------------------------------------------------------------
def test_compiled_blocks_same_output_and_guidance_gradient(ref):
    """torch.compile'd blocks: same forward and same d(loss)/d(x_t) as eager (frozen weights, the guided step's
    case), and the blocks really went through dynamo (graphs compiled)."""
    from torch._dynamo.utils import counters

    from blindsr.device import check_compiler

    try:
        check_compiler(torch.device("cpu"))
    except BlindSRError as e:
        pytest.skip(str(e))
    model = MCFormer(MCFormerConfig.tiny()).eval().requires_grad_(False)
    model.load_state_dict(ref["state_dict"])
    x_t, t, cond = ref["x_t"][:1, :, :16, :16], ref["t"][:1], ref["cond"][:1, :, :4, :4]
    torch._dynamo.reset()  # forget graphs other tests compiled in this process (same shapes: no new graph then)
    results, graphs = [], counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        model.compiled_blocks = compiled
        x = x_t.clone().requires_grad_(True)
        out, kernel = model(x, t, cond)
        (grad,) = torch.autograd.grad(out.square().mean() + kernel.square().sum(), x)
        results.append((out.detach(), grad))
    assert counters["stats"]["unique_graphs"] - graphs >= 4  # one per distinct block (width, heads, size) of the net
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)
