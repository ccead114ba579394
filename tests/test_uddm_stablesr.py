"""UDDM's DDM, stablesr backend (tiny StableSR, random weights, CPU): only the encoder + SPADE train, the loss
falls, exact resume, the export holds the trainable part only, ``load_uddm`` round trip, seeded batch-independent
synthesis that follows its condition; an SD 2.1 folder as the base (fresh encoder / SPADE, the null text
context); the fixture's official weights through the stage-1 route."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from blindsr.cli.main import main
from blindsr.errors import BlindSRError, WeightsError
from blindsr.io.weights import load_safetensors_metadata, load_state_dict
from blindsr.methods.uddm import ddm as D
from blindsr.methods.uddm import ddm_stablesr as S
from blindsr.methods.uddm import recipe as ur
from blindsr.models.sd import stablesr as ss
from blindsr.train import checkpoint as ckpt_io
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "uddm_tiny.yaml")
# the tiny run on the stablesr backend: LR crops of 16 px (whole latent levels: VAE x8, 2 UNet levels)
STABLESR = ["model.ddm.backend=stablesr", "model.ddm.stablesr.size=tiny", "model.ddm.stablesr.tile=0",
            "data.crop=64"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_cfg(**changes) -> D.DDMConfig:
    sc = D.StableSRDDM(**{"size": "tiny", "tile": 0, **changes})
    return D.DDMConfig(backend="stablesr", stablesr=sc, sample_steps=3)


@pytest.fixture(scope="module")
def net() -> S.StableSRDDMNet:
    return S.build_ddm_net(tiny_cfg().stablesr).eval()


@pytest.fixture()
def folders(make_hr_folder, tmp_path) -> tuple[Path, Path]:
    from PIL import Image

    hr = make_hr_folder(3, 72, 80)
    lr = tmp_path / "real-lr"
    lr.mkdir()
    g = gen(1)
    for i in range(2):
        Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()).save(lr / f"photo{i}.png")
    return lr, hr


def train(out: Path, folders, *extra: str, sets: list[str] = STABLESR) -> int:
    lr, hr = folders
    args = [x for s in [f"data.root={hr}", f"data.lr_root={lr}", *sets] for x in ("--set", s)]
    return main(["train", "uddm", "--config", TINY, "--output", str(out), "--device", "cpu", "--no-progress",
                 *args, *extra])


def frozen_state(net: S.StableSRDDMNet) -> dict[str, torch.Tensor]:
    """The SD UNet (without its SPADE layers) and the VAE."""
    unet = {f"unet.{k}": v.clone() for k, v in net.frozen.unet.unet.state_dict().items() if ".spade." not in k}
    return unet | {f"vae.{k}": v.clone() for k, v in net.frozen.vae.state_dict().items()}


def trainable_keys(net: S.StableSRDDMNet) -> set[str]:
    return {f"encoder.{k}" for k in net.encoder.state_dict()} | {f"spade.{k}" for k in net.spade.state_dict()}


# ------------------------------------------------------------------------------------------------ the module
def test_the_module_is_the_trainable_part_and_an_ema_copy_shares_the_frozen_part(net):
    assert set(net.state_dict()) == trainable_keys(net)  # no SD UNet / VAE tensor, no context buffer
    n = sum(p.numel() for p in net.parameters())
    assert n == sum(p.numel() for p in net.encoder.parameters()) + sum(
        p.numel() for p in net.frozen.unet.spade_parameters())
    assert len(net.spade) == len(net.frozen.unet.resnets()) == 8
    assert all(a is b for a, b in zip(net.spade, (r.spade for r in net.frozen.unet.resnets()), strict=True))
    ema = copy.deepcopy(net)  # the trainer's EMA: a copy of the trainable part only
    assert ema.frozen is net.frozen and ema.spade[0] is not net.spade[0]
    z, t = torch.randn(2, 4, 4, 4, generator=gen(1)), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.allclose(ema(z, t, z), net(z, t, z), atol=1e-6)
        for p in ema.spade.parameters():
            p.add_(0.1)
        assert (ema(z, t, z) - net(z, t, z)).abs().max() > 1e-4  # the copy runs with ITS SPADE layers
    rebuilt = S.build_ddm_net(tiny_cfg().stablesr)  # seeded random init: resume and load_uddm rebuild the same
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, frozen_state(rebuilt)[k]) for k, v in frozen_state(net).items())


def test_the_loss_falls_on_an_overfit_run():
    """Eq. 3 trains through the frozen UNet: one (z_0, t, ε) draw overfit by the encoder + SPADE alone. (With
    a random frozen UNet, a fall over fresh noise takes far more steps than a test may: a real SD UNet already
    denoises, a random one must first be steered to.)"""
    net = S.build_ddm_net(tiny_cfg().stablesr)
    diffusion = ss.base_process()
    lr = torch.rand(2, 3, 32, 32, generator=gen(2))
    cond = D.condition(lr, 4)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    t = torch.tensor([300, 600])
    before_frozen = frozen_state(net)

    def loss() -> torch.Tensor:
        return S.eps_loss(net, diffusion, lr, cond, gen(9), t)
    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert loss().item() < 0.5 * before
    assert all(torch.equal(v, frozen_state(net)[k]) for k, v in before_frozen.items())


# ------------------------------------------------------------------------------------------------ training
def test_training_updates_only_encoder_and_spade_exports_them_and_resumes_exactly(tmp_path, folders, monkeypatch):
    seen = {}
    real = ur.uddm_recipe

    def spy(cfg):
        r = real(cfg)
        ddm = r.modules["ddm"]
        seen.update(net=ddm, trainable={k: v.clone() for k, v in ddm.state_dict().items()},
                    frozen=frozen_state(ddm))
        return r
    monkeypatch.setattr(ur, "uddm_recipe", spy)
    full = tmp_path / "full"
    assert train(full, folders) == 0
    net = seen["net"]
    assert isinstance(net, S.StableSRDDMNet)
    assert all(torch.equal(v, frozen_state(net)[k]) for k, v in seen["frozen"].items())  # SD UNet / VAE: bit-identical
    final = load_state_dict(full / "final.safetensors")
    assert set(final) == trainable_keys(net)  # the export: encoder + SPADE only
    changed = {k.split(".")[0] for k, v in final.items() if not torch.equal(v, seen["trainable"][k])}
    assert changed == {"encoder", "spade"}  # both learnt
    meta = load_safetensors_metadata(full / "final.safetensors")
    assert meta["method"] == "uddm" and meta["ddm_backend"] == "stablesr" and meta["ddm_base_weights"] == ""
    assert '"backend": "stablesr"' in meta["config"] and '"size": "tiny"' in meta["config"]
    last = ckpt_io.load_checkpoint(ckpt_io.list_checkpoints(full)[-1][1])
    assert set(last.weights["ddm"]) == set(last.ema["ddm"]) == trainable_keys(net)  # checkpoints too
    assert set(last.state["optimizers"]["ddm"]["state"]) == set(range(len(list(net.parameters()))))

    rows = [{k: float(v) for k, v in r.items() if "/" in k} for r in read_csv(full / "log.csv")]
    assert len(rows) == 3 and "ddm/loss" in rows[0]
    part = tmp_path / "part"
    assert train(part, folders, "--max-steps", "2") == 0
    assert train(part, folders, "--resume", "auto") == 0
    assert [{k: float(v) for k, v in r.items() if "/" in k} for r in read_csv(part / "log.csv")] == rows

    from blindsr.methods.uddm.model import load_uddm

    model = load_uddm(full)  # rebuilds the frozen part from the (random, seeded) base, loads the trainable part
    assert isinstance(model.ddm, S.StableSRDDMNet) and model.ddm_config.backend == "stablesr"
    assert all(torch.equal(v, model.ddm.state_dict()[k]) for k, v in final.items())
    assert all(torch.equal(v, frozen_state(model.ddm)[k]) for k, v in seen["frozen"].items())
    hr = torch.rand(2, 3, 64, 80, generator=gen(3))
    out = model(hr, 0.0, [gen(0), gen(1)], steps=2)
    assert out.shape == (2, 3, 16, 20) and 0 <= out.min() and out.max() <= 1
    cond = D.condition(hr, 4 * 4, (16, 20))
    assert torch.allclose(out, D.synthesize(model.ddm, model.ddm_config, cond, [gen(0), gen(1)], 2), atol=1e-6)
    assert model(hr, 0.5, [gen(0), gen(1)], steps=2).shape == (2, 3, 16, 20)  # Eq. 1 with P-DDM


def test_config_errors(tmp_path, folders, capsys):
    missing = tmp_path / "nope.ckpt"
    assert train(tmp_path / "a", folders, sets=[*STABLESR, f"model.ddm.stablesr.weights={missing}"]) == 2
    err = capsys.readouterr().err
    assert "DDM stablesr weights not found" in err and str(missing) in err and err.count("\n") == 1, err
    assert train(tmp_path / "b", folders, sets=[*STABLESR, "data.crop=32"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert train(tmp_path / "c", folders, sets=[*STABLESR, "model.ddm.stablesr.size=huge"]) == 2
    assert "size 'huge'" in capsys.readouterr().err
    with pytest.raises(BlindSRError, match="multiple of 2"):
        S.build_ddm_net(D.StableSRDDM(size="tiny", tile=5, overlap=2))
    with pytest.raises(BlindSRError, match="backend"):
        D.DDMConfig(backend="latent")


def test_pixel_checkpoints_keep_their_format():
    assert set(ur.ddm_config_dict(D.DDMConfig())) == {"s", "unet", "diffusion", "sample_steps", "tile", "overlap"}
    assert ur.ddm_config_dict(tiny_cfg())["backend"] == "stablesr"


# ------------------------------------------------------------------------------------------------ synthesis
def test_synthesis_is_seeded_batch_independent_and_follows_the_condition(net):
    cfg = tiny_cfg()
    a, b = torch.rand(1, 3, 16, 24, generator=gen(3)), torch.rand(1, 3, 16, 24, generator=gen(4))
    one = D.synthesize(net, cfg, a, [gen(0)])
    assert one.shape == (1, 3, 16, 24) and one.min() >= 0 and one.max() <= 1
    assert torch.equal(one, D.synthesize(net, cfg, a, [gen(0)]))
    pair = D.synthesize(net, cfg, torch.cat([b, a]), [gen(5), gen(0)])
    assert torch.allclose(pair[1:], one, atol=1e-5)  # image i depends on its own generator only
    assert (D.synthesize(net, cfg, b, [gen(0)]) - one).abs().max() > 1e-3  # the condition matters
    assert (D.synthesize(net, cfg, a, [gen(1)]) - one).abs().max() > 1e-3  # and the seed
    odd = D.synthesize(net, cfg, torch.rand(1, 3, 13, 21, generator=gen(6)), [gen(0)])
    assert odd.shape == (1, 3, 13, 21)  # any size: reflect-padded to whole latent levels, cropped back
    mode = tiny_cfg(posterior="mode")
    assert torch.equal(D.synthesize(net, mode, a, [gen(0)]), D.synthesize(net, mode, a, [gen(0)]))
    reports = []
    D.synthesize(net, cfg, a, [gen(0)], steps=2, progress=lambda done, total: reports.append((done, total)))
    assert reports == [(i, 2) for i in range(3)]


def test_tiled_synthesis_runs_the_aggregation_tiles(net):
    cond = torch.rand(1, 3, 48, 64, generator=gen(7))  # latent 6 x 8 > tile 4: aggregation tiles
    tiled = D.synthesize(net, tiny_cfg(tile=4, overlap=2), cond, [gen(0)])
    whole = D.synthesize(net, tiny_cfg(), cond, [gen(0)])
    assert tiled.shape == whole.shape == (1, 3, 48, 64) and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, whole)  # the tiles ran (each with its own encoder features)


# ------------------------------------------------------------------------------------------------ base weights
def test_an_sd_folder_is_a_base_with_a_fresh_encoder_spade_and_the_null_text_context(tmp_path):
    """SD 2.1(-base) in diffusers layout (tiny, random): its UNet and VAE frozen, the context = its text encoder
    on the empty prompt, the encoder and the SPADE layers fresh (seeded)."""
    from blindsr.methods.diffbir.recipe import TINY_SD_LDM
    from blindsr.models.sd import build_text_encoder, build_unet, build_vae, text_config_from_openclip

    cfg = ss.tiny_config()
    torch.manual_seed(5)
    unet, vae = build_unet(cfg.unet), build_vae(cfg.vae)
    text = build_text_encoder(text_config_from_openclip(TINY_SD_LDM["clip"])).eval()
    folder = tmp_path / "sd21"
    for part, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        part.save_pretrained(folder / name)
    sc = D.StableSRDDM(weights=str(folder), size="tiny", tile=0)
    net = S.build_ddm_net(sc)
    got = net.frozen.unet.unet.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, net.frozen.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert torch.allclose(net.context, S.null_text_context(text), atol=1e-6) and net.context.abs().sum() > 0
    again = S.build_ddm_net(sc)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())  # seeded fresh parts
    zeros = S.build_ddm_net(D.StableSRDDM(weights=str(folder), size="tiny", tile=0, context="zeros"))
    assert zeros.context.abs().sum() == 0


def test_the_fixture_config_and_official_weights(reference_dir, tmp_path):
    """``tiny_config`` is the fixture's config; an official stage-1 state dict loads as a base (every part, the
    trained encoder + SPADE included) and reproduces the official eps."""
    ref = torch.load(reference_dir / "stablesr" / "stablesr_tiny_ref.pt", weights_only=True)
    assert ss.tiny_config() == ss.StableSRConfig.from_official(ref["config"]["ldm"])
    path = tmp_path / "stage1.pt"
    torch.save(ref["ldm_state"], path)
    with pytest.raises(WeightsError, match="no text encoder"):
        S.build_ddm_net(D.StableSRDDM(weights=str(path), size="tiny"))  # the fixture has no OpenCLIP
    net = S.build_ddm_net(D.StableSRDDM(weights=str(path), size="tiny", context="zeros"))
    inp = ref["inputs"]
    with torch.no_grad():
        eps = net.eps(inp["z_t"], inp["t"], inp["context"], inp["z_lr"])
    assert (eps - ref["outputs"]["eps"]).abs().max() <= 1e-4
    assert all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for n, p in net.frozen.unet.named_parameters() if ".spade." not in n)
