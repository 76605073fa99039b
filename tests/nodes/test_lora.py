"""LoRA parsing and merging (nodes.checkpoints.lora) against diffusers' own load_lora_weights + fuse_lora.

Tiny random SD1-like and SDXL-like pipelines get random rank-4 LoRAs in Kohya and PEFT key styles; every fused
parameter diffusers produces must equal ours (1e-5), with different U-Net and text-encoder strengths.
"""

from __future__ import annotations

import os

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1")


import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from nodes.checkpoints.keymaps import UNetLayout, unet_map  # noqa: E402
from nodes.checkpoints.lora import (LoraError, LoraPatch, lora_family, merged_weights, module_names,  # noqa: E402
                                    parse_lora)

RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "down_blocks.0.resnets.0.conv1")  # the last: a 3x3 convolution (LoCon)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_XL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
XL_LAYOUT = UNetLayout(attention=(False, True), layers_per_block=2, time_cond=True)


# -- tiny models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from .sd_fixtures import clip_tokenizer, tokenizer_files

    folder = tmp_path_factory.mktemp("clip_tok")
    tokenizer_files(folder, "<|endoftext|>")
    return clip_tokenizer(folder)


def clip(seed: int, projection: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=1000, projection_dim=32)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def tiny_vae() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)


def sd1_pipeline(tokenizer):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32, sample_size=8)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    return diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip(1), tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def sdxl_pipeline(tokenizer):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, norm_num_groups=32, sample_size=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)  # six time ids x 8 + the pooled text (32)
    return diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=clip(1), text_encoder_2=clip(2, True),
                                               tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                               scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)


def components_of(pipe) -> dict[str, nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, name)}


def modules_of(components: dict[str, nn.Module]) -> dict[str, set[str]]:
    return {c: set(dict(m.named_modules())) for c, m in components.items()}


def params_of(components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``"<component>.<param>"`` -> a copy; after fusing, PEFT's ``base_layer`` holds the fused weight."""
    out = {}
    for c, model in components.items():
        for name, value in model.state_dict().items():
            if "lora_" not in name:
                out[f"{c}.{name.replace('.base_layer', '')}"] = value.detach().clone()
    return out


# -- random LoRAs in both styles -----------------------------------------------------------------------------


def random_lora(components: dict[str, nn.Module], seed: int, alpha: str | None = "each"):
    """``{(component, module): (down, up, alpha or None)}`` for the targeted Linear / Conv2d modules.

    ``alpha``: None (none stored), "each" (one per module) or "diffusers": one per module except that the text
    encoders' modules and the U-Net's attention projections share one. diffusers 0.42 reads a single alpha for all
    of those from a Kohya file (the alpha names it derives for them match no module); Kohya's rule is per module.
    """
    gen = torch.Generator().manual_seed(seed)
    shared = float(torch.empty(()).uniform_(1.0, 8.0, generator=gen))
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    lora = {}
    for c, model in components.items():
        suffixes = UNET_TARGETS if c == "unet" else TEXT_TARGETS
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not any(
                    name == s or name.endswith("." + s) for s in suffixes):
                continue
            w = module.weight
            down = torch.randn((RANK, *w.shape[1:]), generator=gen) * 0.3
            up = torch.randn((w.shape[0], RANK, *[1] * (w.dim() - 2)), generator=gen) * 0.3
            a = float(torch.empty(()).uniform_(1.0, 8.0, generator=gen)) if alpha else None
            if alpha == "diffusers" and (c != "unet" or name.endswith(attention)):
                a = shared
            lora[c, name] = (down, up, a)
    assert len(lora) > 20
    return lora


def file_name(component: str, module: str) -> str:
    """Files name CLIP modules ``text_model.encoder...`` even where transformers 5 dropped that level."""
    return module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"


def kohya_state(lora, prefixes=KOHYA, unet_name=lambda name: name) -> dict[str, torch.Tensor]:
    state = {}
    for (c, module), (down, up, alpha) in lora.items():
        name = prefixes[c] + (unet_name(module) if c == "unet" else file_name(c, module)).replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def peft_state(lora) -> dict[str, torch.Tensor]:
    state = {}
    for (c, module), (down, up, alpha) in lora.items():
        name = f"{c}.{file_name(c, module)}"
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def expected_delta(lora, key: tuple[str, str], strength: float) -> torch.Tensor:
    down, up, alpha = lora[key]
    return strength * (alpha or RANK) / RANK * (up.flatten(1) @ down.flatten(1))


# -- against diffusers ---------------------------------------------------------------------------------------


def check_against_diffusers(pipe, state, lora, strength_model, strength_text, unet_to_original=None) -> None:
    components = components_of(pipe)
    before = params_of(components)
    patches = parse_lora(state, modules_of(components), unet_to_original)
    assert {(p.component, p.module) for p in patches} == set(lora)
    ours = {**before, **merged_weights(patches, before, strength_model, strength_text)}
    changed = {k for k in ours if not torch.equal(ours[k], before[k])}
    assert changed == {p.weight_name for p in patches}

    pipe.load_lora_weights(dict(state))
    pipe.fuse_lora(components=["unet"], lora_scale=strength_model)
    pipe.fuse_lora(components=[c for c in components if c != "unet"], lora_scale=strength_text)
    theirs = params_of(components)
    assert theirs.keys() == ours.keys()
    worst = max((theirs[k] - ours[k]).abs().max().item() for k in ours)
    assert worst <= 1e-5
    print(f"max abs difference from diffusers' fuse_lora: {worst:.3g}")  # shown with -s


@pytest.mark.parametrize("style, strength_model, strength_text", [("kohya", 0.8, 1.3), ("peft", 1.25, -0.6)])
def test_sd1_merge_equals_diffusers_fuse(tokenizer, style, strength_model, strength_text):
    pipe = sd1_pipeline(tokenizer)
    # diffusers reads no alpha from PEFT-style files (alpha = rank); Kohya files carry one per module
    lora = random_lora(components_of(pipe), seed=3, alpha="diffusers" if style == "kohya" else None)
    state = kohya_state(lora) if style == "kohya" else peft_state(lora)
    check_against_diffusers(pipe, state, lora, strength_model, strength_text)


def test_sdxl_kohya_sgm_names_equal_diffusers_fuse(tokenizer):
    pipe = sdxl_pipeline(tokenizer)
    keymap = unet_map(XL_LAYOUT)
    lora = random_lora(components_of(pipe), seed=4, alpha="diffusers")
    state = kohya_state(lora, KOHYA_XL, keymap.rename_back)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_") for k in state)
    assert any(k.startswith("lora_unet_middle_block_1_transformer_blocks_1_") for k in state)
    assert any(k.startswith("lora_unet_output_blocks_2_1_") for k in state)
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in state  # down_blocks.0.resnets.0.conv1
    with pytest.raises(LoraError, match="match nothing"):  # sgm names need the key map
        parse_lora(state, modules_of(components_of(pipe)))
    check_against_diffusers(pipe, state, lora, 0.7, 1.1, keymap.rename_back)


def test_per_module_alpha_and_older_diffusers_names(tokenizer):
    """Kohya and PEFT keys with one alpha per module, and the older attention-processor / lora.down spellings,
    give the same patches; the merge is the formula written out."""
    pipe = sd1_pipeline(tokenizer)
    components = components_of(pipe)
    modules = modules_of(components)
    lora = random_lora(components, seed=5)
    state = peft_state(lora)
    patches = {(p.component, p.module): p for p in parse_lora(state, modules)}
    for key, (down, up, alpha) in lora.items():
        assert patches[key].alpha == pytest.approx(alpha) and patches[key].down is down and patches[key].up is up
    kohya = {(p.component, p.module): p.alpha for p in parse_lora(kohya_state(lora), modules)}
    assert kohya == {key: p.alpha for key, p in patches.items()}
    older = {}
    for (c, module), (down, up, alpha) in lora.items():
        head, _, last = file_name(c, module).rpartition(".")
        if c == "unet" and last in ("to_q", "to_k", "to_v"):
            name = f"{head}.processor.{last}_lora"
        elif c == "unet" and module.endswith("to_out.0"):
            name = module.removesuffix(".to_out.0") + ".processor.to_out_lora"
        elif c == "text_encoder" and last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"{head}.to_{last[0] if last != 'out_proj' else 'out'}_lora"
        else:
            name = f"{file_name(c, module)}.lora"
        prefix = "" if c == "unet" and len(older) % 2 else f"{c}."  # unprefixed = U-Net, as in early files
        older[f"{prefix}{name}.down.weight"], older[f"{prefix}{name}.up.weight"] = down, up
        older[f"{c}.{module}.alpha"] = torch.tensor(alpha)  # the model's own spelling works too
    again = {(p.component, p.module): p for p in parse_lora(older, modules)}
    assert again.keys() == patches.keys()
    params = params_of(components)
    ours = merged_weights(again.values(), params, 0.9, 0.4)
    for key in lora:
        c, module = key
        name = f"{c}.{module}.weight"
        strength = 0.9 if c == "unet" else 0.4
        want = params[name] + expected_delta(lora, key, strength).reshape(params[name].shape)
        assert (ours[name] - want).abs().max().item() <= 1e-6


# -- merge rules ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_parts(tokenizer):
    pipe = sd1_pipeline(tokenizer)
    components = components_of(pipe)
    return modules_of(components), params_of(components), components


def test_strength_zero_is_bitwise_identity_and_per_component(sd1_parts):
    modules, params, components = sd1_parts
    patches = parse_lora(kohya_state(random_lora(components, seed=6)), modules)
    for name, value in merged_weights(patches, params, 0.0, 0.0).items():
        assert value is params[name]
    text_only = merged_weights(patches, params, 0.0, 1.0)
    assert all(torch.equal(v, params[k]) == k.startswith("unet.") for k, v in text_only.items())


def test_stacking_two_loras_adds_their_deltas(sd1_parts):
    modules, params, components = sd1_parts
    a = parse_lora(kohya_state(random_lora(components, seed=7)), modules)
    b = parse_lora(peft_state(random_lora(components, seed=8)), modules)
    once_a = merged_weights(a, params, 0.7, 0.5)
    stacked = merged_weights(b, {**params, **once_a}, 0.7, 0.5)
    once_b = merged_weights(b, params, 0.7, 0.5)
    together = merged_weights([*a, *b], params, 0.7, 0.5)
    for name, value in stacked.items():
        summed = params[name] + (once_a[name] - params[name]) + (once_b[name] - params[name])
        assert (value - summed).abs().max().item() <= 1e-5
        assert (together[name] - value).abs().max().item() <= 1e-5
        assert not torch.equal(value, once_a[name])


def test_low_precision_weights_merge_in_float32():
    weight = (torch.randn(6, 5) * 0.1).to(torch.float16)
    patch = LoraPatch("unet", "x", down=torch.randn(2, 5), up=torch.randn(6, 2), alpha=1.0)
    merged = merged_weights([patch], {"unet.x.weight": weight}, 0.5, 1.0)["unet.x.weight"]
    assert merged.dtype == torch.float16
    assert torch.equal(merged, (weight.float() + 0.25 * patch.up @ patch.down).half())


def test_shape_mismatch_names_module_and_shapes(sd1_parts):
    """A LoRA for a wider model whose keys happen to match (SDXL's 2048-wide context on a 32-wide one)."""
    modules, params, _ = sd1_parts
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"lora_unet_{module.replace('.', '_')}.lora_down.weight": torch.randn(RANK, 2048),
             f"lora_unet_{module.replace('.', '_')}.lora_up.weight": torch.randn(32, RANK)}
    patches = parse_lora(state, modules)
    with pytest.raises(LoraError, match=rf"unet\.{module}.*\(32, 32\).*\(32, 4\) x \(4, 2048\)"):
        merged_weights(patches, params, 1.0, 1.0)


def test_unknown_keys_are_listed_never_dropped(sd1_parts):
    modules, _, components = sd1_parts
    state = kohya_state(random_lora(components, seed=9))
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(RANK, 32)
    state["text_encoder.text_model.encoder.layers.9.mlp.fc1.lora_A.weight"] = torch.zeros(RANK, 32)
    state["bundle_emb.cat.string_to_param.*"] = torch.zeros(1, 32)
    with pytest.raises(LoraError, match=r"^3 LoRA keys match nothing in this model, e\.g\. .*down_blocks_7.*"
                                         r"layers\.9"):
        parse_lora(state, modules)
    with pytest.raises(LoraError, match="match nothing"):  # an SD1 LoRA has no second text encoder here
        parse_lora({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 32),
                    "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, RANK)}, modules)


def test_incomplete_pairs_and_rank_mismatch(sd1_parts):
    modules, _, _ = sd1_parts
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(LoraError, match=r"text_encoder\.encoder\.layers\.0\.mlp\.fc1 has no up"):
        parse_lora({f"{name}.lora_down.weight": torch.zeros(RANK, 32), f"{name}.alpha": torch.tensor(2.0)}, modules)
    with pytest.raises(LoraError, match="not a rank-r pair"):
        parse_lora({f"{name}.lora_down.weight": torch.zeros(RANK, 32),
                    f"{name}.lora_up.weight": torch.zeros(37, RANK + 1)}, modules)


@pytest.mark.parametrize("key, style", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LoKr"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "LoCon with a Tucker"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale", "DoRA"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
])
def test_other_adapter_styles_are_refused_by_name(sd1_parts, key, style):
    modules, _, _ = sd1_parts
    state = {key: torch.zeros(RANK, 32), "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight":
             torch.zeros(RANK, 32, 1, 1)}
    with pytest.raises(LoraError, match=rf"^{style}.*not supported.*{key.split('.')[-1]}"):
        parse_lora(state, modules)


def test_module_names_from_params(sd1_parts):
    modules, params, _ = sd1_parts
    names = module_names(params)
    assert names.keys() == {"unet", "text_encoder"} and names["unet"] <= modules["unet"]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names["unet"]
    assert "encoder.layers.1.mlp.fc2" in names["text_encoder"]  # transformers 5: no text_model level


# -- family from the header ----------------------------------------------------------------------------------


def kohya_header(width: int, te: str = "lora_te_", sgm: bool = False) -> dict[str, tuple[int, ...]]:
    attn = "input_blocks_4_1" if sgm else "down_blocks_1_attentions_0"
    k = f"lora_unet_{attn}_transformer_blocks_0_attn2_to_k"
    q = f"{te}text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{k}.lora_down.weight": (RANK, width), f"{k}.lora_up.weight": (320, RANK), f"{k}.alpha": (),
            f"{q}.lora_down.weight": (RANK, 768), f"{q}.lora_up.weight": (768, RANK)}


def test_lora_family_from_names_and_shapes():
    assert lora_family(kohya_header(768)) == "sd1"
    assert lora_family(kohya_header(1024)) == "sd2"
    assert lora_family(kohya_header(2048, te="lora_te1_", sgm=True)) == "sdxl"
    unet_only_sgm = {k: v for k, v in kohya_header(320, sgm=True).items() if k.startswith("lora_unet_")}
    assert lora_family(unet_only_sgm) == "sdxl"  # the names alone (320 is no context width)
    te_only = {k: v for k, v in kohya_header(768).items() if k.startswith("lora_te_")}
    assert lora_family(te_only) == "sd1"
    assert lora_family({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (RANK, 1024)}) == "sd2"
    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    assert lora_family({f"{peft}.lora_A.weight": (RANK, 2048), f"{peft}.lora_B.weight": (640, RANK)}) == "sdxl"
    assert lora_family({f"{peft}.lora_A.weight": (RANK, 1024)}) == "sd2"
    assert lora_family({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (RANK, 1280)}) == "sdxl"
    old = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight"
    assert lora_family({old: (RANK, 768)}) == "sd1"
    assert lora_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (RANK, 320)}) is None
    assert lora_family({**kohya_header(768), **{k.replace("down_blocks_1", "down_blocks_2"): (RANK, 1024)
                                                  for k in kohya_header(1024) if "attn2" in k}}) is None

