"""SD 2.1 parts through diffusers/transformers against the official DiffBIR code (fixtures in shared/reference)."""

from __future__ import annotations

import ast

import pytest
import torch

from blindsr.errors import BlindSRError, WeightsError
from blindsr.models import ircontrolnet as icn
from blindsr.models import sd
from blindsr.models.sd import tokenizer as ct

OFFICIAL = {"unet": 865_910_724, "vae": 83_653_863, "clip": 354_032_641}


def read_key_dump(path) -> dict[str, torch.Tensor]:
    """A ``key<TAB>(shape)<TAB>dtype`` dump as meta tensors."""
    out = {}
    for line in path.read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = torch.empty(ast.literal_eval(shape), device="meta")
    return out


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fixture_configs(ref: dict) -> dict[str, dict]:
    c = ref["configs"]
    return {"unet": sd.unet_config_from_ldm(c["unet"]), "vae": sd.vae_config_from_ldm(c["vae"]),
            "text_encoder": sd.text_config_from_openclip(c["clip"])}


def load_fixture_models(ref: dict):
    cfg = fixture_configs(ref)
    models = sd.load_sd_checkpoint(ref["cldm_state"], cfg)
    ccfg = icn.IRControlNetConfig.from_unet_config(cfg["unet"], ref["configs"]["controlnet"]["hint_channels"])
    controlnet = icn.load_official_controlnet(
        {k: v for k, v in ref["cldm_state"].items() if k.startswith("controlnet.")}, ccfg)
    return models, controlnet


@pytest.fixture(scope="module")
def diffbir_dir(reference_dir):
    return reference_dir / "diffbir"


@pytest.fixture(scope="module")
def strong(diffbir_dir):
    ref = torch.load(diffbir_dir / "tiny_cldm_ref_strong.pt", weights_only=True)
    models, controlnet = load_fixture_models(ref)
    return ref, models, controlnet


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------- full size
@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return sd.build_unet(), sd.build_vae(), sd.build_text_encoder()


def test_full_size_parameter_counts(full_meta, diffbir_dir):
    unet, vae, text = full_meta
    assert n_params(unet) == OFFICIAL["unet"]
    assert n_params(vae) == OFFICIAL["vae"]
    # Official text tower = our 23-layer CLIPTextModel + the tensors the penultimate-layer encoder never uses.
    clip = read_key_dump(diffbir_dir / "clip.txt")
    unused = [k for k in clip if k.endswith(("text_projection", "logit_scale")) or ".resblocks.23." in k]
    assert len(unused) == 14  # 12 tensors of resblock 23 + text_projection + logit_scale
    assert n_params(text) == 340_387_840
    assert n_params(text) + sum(clip[k].numel() for k in unused) == OFFICIAL["clip"]


def test_full_size_checkpoint_loads_strictly(full_meta, diffbir_dir):
    unet, vae, text = full_meta
    ckpt = {**read_key_dump(diffbir_dir / "unet.txt"), **read_key_dump(diffbir_dir / "vae.txt"),
            **read_key_dump(diffbir_dir / "clip.txt"), "betas": torch.empty(1000, device="meta")}
    parts = sd.split_sd_checkpoint(ckpt)
    assert [len(parts[k]) for k in ("unet", "vae", "clip")] == [686, 248, 294]
    for model, conv, part, cfg in [(unet, sd.convert_ldm_unet, "unet", "unet"), (vae, sd.convert_ldm_vae, "vae", "vae")]:
        converted = conv(parts[part], sd.load_config(cfg))
        own = model.state_dict()
        assert converted.keys() == own.keys()
        assert all(converted[k].shape == own[k].shape for k in own)
        sd.load_converted(model, converted, part)
    converted = sd.convert_openclip_text(parts["clip"], sd.load_config("text_encoder"))
    assert len(converted) == 294 - 14 + 4 * 23  # in_proj weight and bias each split into q, k, v
    sd.load_text_encoder_state(text, converted)
    # strict: a missing tensor or an unknown one is a one-line WeightsError
    with pytest.raises(WeightsError, match="missing"):
        sd.load_converted(unet, {k: v for k, v in sd.convert_ldm_unet(parts["unet"], sd.load_config("unet")).items()
                                 if k != "conv_out.bias"}, "unet")
    with pytest.raises(WeightsError, match="unexpected"):
        sd.convert_ldm_unet({**parts["unet"], "label_emb.0.weight": torch.empty(1)}, sd.load_config("unet"))
    with pytest.raises(WeightsError, match="unexpected"):
        sd.convert_openclip_text({**parts["clip"], "visual.proj": torch.empty(1)}, sd.load_config("text_encoder"))


def test_shipped_configs_are_the_official_sd21_architecture():
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
                transformer_depth=1, context_dim=1024)  # configs/inference/cldm.yaml (unet_cfg)
    vae = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                          ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[]))
    clip = dict(embed_dim=1024, layer="penultimate",
                text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24))
    drop = {"sample_size"}  # the latent/pixel size a diffusers folder advertises, not architecture
    strip = lambda d: {k: v for k, v in d.items() if k not in drop}  # noqa: E731
    assert strip(sd.unet_config_from_ldm(unet)) == strip(sd.load_config("unet"))
    assert strip(sd.vae_config_from_ldm(vae)) == strip(sd.load_config("vae"))
    assert sd.text_config_from_openclip(clip) == sd.load_config("text_encoder")
    assert sd.load_config("text_encoder")["num_hidden_layers"] == 23 and sd.load_config("text_encoder")["hidden_act"] == "gelu"


# ------------------------------------------------------------------------------------------------- fixtures
def test_strong_fixture_conformance(strong):
    ref, m, controlnet = strong
    with torch.no_grad():
        c_txt = sd.encode_text(m.text_encoder, ref["tokens"])
        c_unc = sd.encode_text(m.text_encoder, ref["uncond_tokens"])
        c_img = sd.vae_encode(m.vae, ref["x"])
        controls = controlnet(ref["z_t"], ref["t"], c_img, c_txt)
        eps = icn.controlled_unet(m.unet, ref["z_t"], ref["t"], c_txt, controls)
        eps_unc = icn.ControlledUNet(m.unet, controlnet)(ref["z_t"], ref["t"], c_unc, c_img)
        eps_half = icn.controlled_unet(m.unet, ref["z_t"], ref["t"], c_txt, controls, 0.5)
        x_rec = sd.vae_decode(m.vae, ref["c_img"])
    assert max_diff(c_txt, ref["c_txt"]) <= 1e-5
    assert max_diff(c_unc, ref["c_txt_uncond"]) <= 1e-5
    assert max_diff(c_img, ref["c_img"]) <= 1e-5
    assert len(controls) == len(ref["control"]) == 5
    for ours, theirs in zip(controls, ref["control"], strict=True):
        assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(eps, ref["eps"]) <= 1e-4
    assert max_diff(eps_unc, ref["eps_uncond"]) <= 1e-4
    assert max_diff(eps_half, ref["eps_strength_0p5"]) <= 1e-4
    assert max_diff(x_rec, ref["x_rec"]) <= 1e-4


def test_original_fixture_smoke(diffbir_dir):
    ref = torch.load(diffbir_dir / "tiny_cldm_ref.pt", weights_only=True)
    m, controlnet = load_fixture_models(ref)
    tokens = ct.pack_tokens([[320, 1125]])  # "a photo" (README §2)
    with torch.no_grad():
        c_txt = sd.encode_text(m.text_encoder, tokens)
        c_img = sd.vae_encode(m.vae, ref["x"])
        eps = icn.ControlledUNet(m.unet, controlnet)(ref["z_t"], ref["t"], c_txt, c_img)
        controls = controlnet(ref["z_t"], ref["t"], c_img, c_txt)
    assert max_diff(c_txt, ref["c_txt"]) <= 1e-6
    assert max_diff(c_img, ref["c_img"]) <= 1e-6
    assert max_diff(eps, ref["eps"]) <= 1e-6
    assert all(max_diff(a, b) <= 1e-6 for a, b in zip(controls, ref["control"], strict=True))


def test_sd_checkpoint_prefixes_equal_controlldm_prefixes(strong):
    ref = strong[0]
    rename = {"unet.": "model.diffusion_model.", "vae.": "first_stage_model.", "clip.": "cond_stage_model."}
    ckpt = {}
    for k, v in ref["cldm_state"].items():
        prefix = next((p for p in rename if k.startswith(p)), None)
        if prefix:
            ckpt[rename[prefix] + k[len(prefix):]] = v
    ckpt["model_ema.decay"] = torch.tensor(0.999)  # ignored like the official loader does
    a, b = sd.split_sd_checkpoint(ckpt), sd.split_sd_checkpoint(ref["cldm_state"])
    assert all(a[p].keys() == b[p].keys() and all(a[p][k] is b[p][k] for k in a[p]) for p in a)
    with pytest.raises(WeightsError, match="first_stage_model"):
        sd.split_sd_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("first_stage_model.")})


def test_sd_checkpoint_file_with_state_dict_wrapper(strong, tmp_path):
    ref, m, controlnet = strong
    rename = {"unet.": "model.diffusion_model.", "vae.": "first_stage_model.", "clip.": "cond_stage_model."}
    state = {rename[p] + k[len(p):]: v.half() for k, v in ref["cldm_state"].items()
             for p in rename if k.startswith(p)}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "v2-1_tiny.ckpt")
    loaded = sd.load_sd_checkpoint(tmp_path / "v2-1_tiny.ckpt", fixture_configs(ref))
    assert loaded.unet.dtype == torch.float32 and not any(p.requires_grad for p in loaded.vae.parameters())
    with torch.no_grad():
        c_txt = sd.encode_text(loaded.text_encoder, ref["tokens"])
    assert max_diff(c_txt, ref["c_txt"]) < 0.05  # fp16-rounded weights, fp32 compute


def test_converters_agree_with_diffusers_single_file_utils(strong):
    """Independent cross-check of the LDM -> diffusers key mapping (values, not just names and shapes)."""
    from diffusers.loaders import single_file_utils as sfu

    ref = strong[0]
    cfg = fixture_configs(ref)
    state = {("model.diffusion_model." + k[5:] if k.startswith("unet.") else "first_stage_model." + k[4:]): v
             for k, v in ref["cldm_state"].items() if k.startswith(("unet.", "vae."))}
    parts = sd.split_sd_checkpoint({**state, **{k: v for k, v in ref["cldm_state"].items() if k.startswith("clip.")}})
    for ours, theirs in [(sd.convert_ldm_unet(parts["unet"], cfg["unet"]), sfu.convert_ldm_unet_checkpoint(state, cfg["unet"])),
                         (sd.convert_ldm_vae(parts["vae"], cfg["vae"]), sfu.convert_ldm_vae_checkpoint(state, cfg["vae"]))]:
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_diffusers_folder_round_trip(strong, tmp_path):
    ref, m, controlnet = strong
    m.unet.save_pretrained(tmp_path / "unet")
    m.vae.save_pretrained(tmp_path / "vae")
    m.text_encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = sd.load_diffusers_folder(tmp_path)
    with torch.no_grad():
        c_txt = sd.encode_text(loaded.text_encoder, ref["tokens"])
        c_img = sd.vae_encode(loaded.vae, ref["x"])
        eps = icn.ControlledUNet(loaded.unet, controlnet)(ref["z_t"], ref["t"], c_txt, c_img)
    assert max_diff(eps, ref["eps"]) <= 1e-4 and max_diff(c_txt, ref["c_txt"]) <= 1e-5
    with pytest.raises(WeightsError, match="not a diffusers"):
        sd.load_diffusers_folder(tmp_path / "unet")


def test_vae_sample_uses_generator(strong):
    ref, m, _ = strong
    with torch.no_grad():
        a = sd.vae_encode(m.vae, ref["x"], sample=True, generator=torch.Generator().manual_seed(1))
        b = sd.vae_encode(m.vae, ref["x"], sample=True, generator=torch.Generator().manual_seed(1))
        mode = sd.vae_encode(m.vae, ref["x"])
    assert torch.equal(a, b) and not torch.equal(a, mode)


# ------------------------------------------------------------------------------------------------- tokenizer
def test_pack_tokens_conventions():
    t = ct.pack_tokens([[320, 1125], list(range(1, 200))])
    assert t.dtype == torch.long and t.shape == (2, 77)
    assert t[0, :4].tolist() == [ct.SOT, 320, 1125, ct.EOT] and t[0, 4:].eq(0).all()  # zero padding
    assert t[1, 0] == ct.SOT and t[1, -1] == ct.EOT and t[1, 1:76].tolist() == list(range(1, 76))


def test_bpe_with_a_synthetic_vocabulary(tmp_path):
    # merges: ("l","o") then ("lo","w</w>"); the rest is filler so the file has the official merge count
    merges = ["l o", "lo w</w>"] + [f"x{i} y{i}" for i in range(ct.NUM_MERGES - 2)]
    path = tmp_path / "merges.txt"
    path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = ct.load_tokenizer(tmp_path)  # a folder holding merges.txt, as in a diffusers tokenizer/
    assert tok.bpe("low") == ["low</w>"]
    assert tok.bpe("lol") == ["lo", "l</w>"]
    ids = tok.encode("  LOW\tlow ")
    assert ids == [tok.encoder["low</w>"]] * 2 and ids[0] == 513  # merged tokens start at id 512 = 2 * 256
    assert tok.encoder["<|startoftext|>"] == ct.SOT and tok.encoder["<|endoftext|>"] == ct.EOT
    assert tok.encoder["!"] == 0 and tok.encoder["a"] == ord("a") - ord("!")  # printable bytes first
    with pytest.raises(BlindSRError, match="not a CLIP BPE"):
        path.write_text("#version\nl o\n")
        ct.load_tokenizer(path)


def test_tokenizer_matches_fixture_tokens(strong):
    if ct.find_vocab() is None and __import__("importlib").util.find_spec("instant_clip_tokenizer") is None:
        pytest.skip(f"no CLIP vocabulary here (set {ct.VOCAB_ENV} or install instant-clip-tokenizer)")
    ref = strong[0]
    tok = ct.load_tokenizer()
    assert torch.equal(tok(ref["prompts"]), ref["tokens"])
    assert torch.equal(tok(ref["uncond_prompts"]), ref["uncond_tokens"])
