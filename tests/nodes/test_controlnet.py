"""ControlNet: zero-initialised outputs leave the denoiser unchanged; schedule window, strength, stacking,
compatibility checks, checkpoint round trip (U-Net and DiT); the control preprocessors on shapes images; the
control-image size policy; and txt2img through the Engine with a ControlNet inside batched / sequential CFG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nodes.control
from nodegraph import Engine
from nodegraph.engine import default_registry
from nodegraph.roots import ModelRoots
from nodes.adapters import (
    ControlImageResized, Controlled, DenoiserInfo, DenoiserModel, Guided, add_control, check_pair, sigma_window,
)
from nodes.image_ops import edges, object_mask
from nodes.diffusion import schedules
from nodes.diffusion.math import append_zero
from nodes.models.config import load_folder, save_folder
from nodes.models.controlnet import ControlNetDiT, ControlNetUNet
from nodes.models.dit import DiT, DiTConfig
from nodes.models.unet import UNet, UNetConfig
from nodes.shapes import data
from tests.nodes.conftest import SIZE, SPACE, link, randomize, txt2img_graph

HINT = (8, 16)  # hint factor 2: the tiny-test VAE's 32x32 pixels -> 16x16 latents
LATENT = (1, 4, SIZE // 2, SIZE // 2)


def base_model(arch: str, seed: int = 0) -> DenoiserModel:
    if arch == "unet":
        net = randomize(UNet(UNetConfig.from_name("tiny-test")), seed)
        return DenoiserModel(net, DenoiserInfo(prediction="v", train_schedule="sd15", latent_space=SPACE))
    net = randomize(DiT(DiTConfig.from_name("tiny-test")), seed)
    return DenoiserModel(net, DenoiserInfo(prediction="flow", train_schedule="sd3", latent_space=SPACE))


def fresh_controlnet(base: DenoiserModel) -> torch.nn.Module:
    if isinstance(base.net, UNet):
        return ControlNetUNet.from_unet(base.net, hint_widths=HINT, space=SPACE).eval()
    return ControlNetDiT.from_dit(base.net, control_depth=1, hint_widths=HINT, space=SPACE).eval()


def perturb(controlnet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move the zero-initialised output layers (zero convs / linears, the hint encoder's last layer) off zero."""
    gen = torch.Generator().manual_seed(seed)
    zero = [m for name, m in controlnet.named_modules()
            if name.startswith(("zero_convs.", "zero_linears.")) or name in ("mid_out", "hint_encoder.out")]
    assert zero
    with torch.no_grad():
        for module in zero:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return controlnet


def sigmas_for(arch: str, steps: int = 8) -> torch.Tensor:
    if arch == "dit":
        return append_zero(schedules.flow_sigmas(steps))
    return append_zero(schedules.karras_sigmas(steps, 0.03, 14.6, 7.0))


def inputs(seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *LATENT[1:], generator=gen)
    cond = {"tokens": torch.randn(batch, 5, 16, generator=gen), "mask": torch.ones(batch, 5, dtype=torch.bool),
            "pooled": torch.randn(batch, 16, generator=gen)}
    return x, cond, torch.rand(1, 3, SIZE, SIZE, generator=gen)


ARCHS = ["unet", "dit"]


# ---------------------------------------------------------------------------------------------------------
# architecture and wrapper
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_controlnet_leaves_the_output_bit_identical(arch) -> None:
    base = base_model(arch)
    controlnet = fresh_controlnet(base)
    x, cond, image = inputs()
    controlled = Controlled(base, controlnet, image)
    with torch.inference_mode():
        for sigma in sigmas_for(arch)[:-1:3]:
            residuals = controlled.residuals(x, sigma, cond)
            flat = residuals["down"] + [residuals["mid"]] if arch == "unet" else residuals
            assert all(r is None or not r.any() for r in flat)
            assert torch.equal(controlled(x, sigma, cond), base(x, sigma, cond))


def test_from_unet_and_from_dit_copy_the_trained_weights() -> None:
    unet, dit = base_model("unet").net, base_model("dit").net
    cn_unet = ControlNetUNet.from_unet(unet, hint_widths=HINT)
    for key, value in unet.encoder.state_dict().items():
        assert torch.equal(cn_unet.encoder.state_dict()[key], value)
    cn_dit = ControlNetDiT.from_dit(dit, control_depth=1, hint_widths=HINT)
    for name in ("blocks.0", "x_embedder", "t_embedder", "pooled_embedder"):
        mine, theirs = cn_dit.get_submodule(name).state_dict(), dit.get_submodule(name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert len(cn_dit.blocks) == 1 and cn_dit.config.depth == dit.config.depth == 2


@pytest.mark.parametrize("variant", ["long_skip", "mix_ffn", "pooled_tokens"])
def test_a_dit_variant_takes_control_from_copies_of_its_first_blocks(variant: str) -> None:
    """Long skips: the copies are the first half, whose outputs the skips keep. Mix-FFN: the copies keep the
    convolutions and get the token grid. Pooled tokens: the copies see the same extra context tokens."""
    config = DiTConfig.from_name("tiny-test").replace(depth=4, **{variant: 2 if variant == "pooled_tokens" else True})
    base = DenoiserModel(randomize(DiT(config)), DenoiserInfo(prediction="flow", train_schedule="sd3",
                                                                latent_space=SPACE))
    controlnet = ControlNetDiT.from_dit(base.net, control_depth=2, hint_widths=HINT, space=SPACE).eval()
    assert getattr(controlnet.config, variant) and not hasattr(controlnet, "skip_linears")
    if variant == "mix_ffn":
        torch.testing.assert_close(controlnet.blocks[1].mlp.dwconv.weight, base.net.blocks[1].mlp.dwconv.weight)
    if variant == "pooled_tokens":
        torch.testing.assert_close(controlnet.pooled_to_tokens.weight, base.net.pooled_to_tokens.weight)
    check_pair(controlnet, base.net)
    x, cond, image = inputs()
    with torch.inference_mode():
        plain = base(x, 0.5, cond)
        assert torch.equal(Controlled(base, controlnet, image)(x, 0.5, cond), plain)
        perturb(controlnet, 1)
        residuals = Controlled(base, controlnet, image).residuals(x, 0.5, cond)
        assert [r is None for r in residuals] == [False, False, True, True]  # the first half, unskipped
        assert not torch.allclose(Controlled(base, controlnet, image)(x, 0.5, cond), plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_shapes_are_what_the_denoiser_takes(arch) -> None:
    base = base_model(arch)
    x, cond, image = inputs(batch=2)
    controlnet = perturb(fresh_controlnet(base), 1)
    with torch.inference_mode():
        out = Controlled(base, controlnet, image).residuals(x, 1.0, cond)
    if arch == "unet":
        skips, mid, _ = base.net.encoder(x, torch.zeros(2), cond["tokens"])
        assert [r.shape for r in out["down"]] == [s.shape for s in skips] and out["mid"].shape == mid.shape
    else:
        assert out[0].shape == (2, 64, 32) and out[1] is None  # control_depth 1 of depth 2


@pytest.mark.parametrize("arch", ARCHS)
def test_perturbed_controlnet_acts_only_inside_start_end(arch) -> None:
    base = base_model(arch)
    controlnet = perturb(fresh_controlnet(base), 1)
    x, cond, image = inputs()
    sigmas = sigmas_for(arch)  # 8 steps: start 0.25, end 0.75 -> steps 2..5
    controlled = Controlled(base, controlnet, image, start=0.25, end=0.75, sigmas=sigmas)
    changed = []
    with torch.inference_mode():
        for sigma in sigmas[:-1]:
            diff = (controlled(x, sigma, cond) - base(x, sigma, cond)).abs().max()
            changed.append(bool(diff > 1e-4) if diff else False)
    assert changed == [False, False, True, True, True, True, False, False]


def test_schedule_window_follows_the_diffusers_rule() -> None:
    sigmas = torch.linspace(8, 1, 8).tolist() + [0.0]
    sig = torch.tensor(sigmas)
    assert sigma_window(sig, 0.0, 1.0) == (0.0, float("inf"))
    low, high = sigma_window(sig, 0.3, 0.6)  # i / 8 >= 0.3 -> i >= 3; (i + 1) / 8 <= 0.6 -> i <= 3
    assert low == pytest.approx(sigmas[3]) and high == pytest.approx(sigmas[3])
    assert sigma_window(sig, 0.5, 0.55) is None
    with pytest.raises(ValueError, match="wire the sampler's sigmas"):
        sigma_window(None, 0.2, 1.0)
    with pytest.raises(ValueError, match="start <= end"):
        sigma_window(sig, 0.8, 0.2)


@pytest.mark.parametrize("arch", ARCHS)
def test_strength_zero_is_no_control_and_strength_scales_the_residuals(arch) -> None:
    base = base_model(arch)
    controlnet = perturb(fresh_controlnet(base), 2)
    x, cond, image = inputs()
    sigma = sigmas_for(arch)[2]
    with torch.inference_mode():
        assert torch.equal(Controlled(base, controlnet, image, strength=0.0)(x, sigma, cond), base(x, sigma, cond))
        one = Controlled(base, controlnet, image, strength=1.0).residuals(x, sigma, cond)
        two = Controlled(base, controlnet, image, strength=2.0).residuals(x, sigma, cond)
    flat = (lambda r: r["down"] + [r["mid"]]) if arch == "unet" else (lambda r: [t for t in r if t is not None])
    assert all(torch.allclose(b, 2 * a, atol=1e-6) for a, b in zip(flat(one), flat(two)))
    assert any(a.abs().max() > 1e-3 for a in flat(one))


@pytest.mark.parametrize("arch", ARCHS)
def test_two_stacked_controlnets_add_their_residuals(arch) -> None:
    base = base_model(arch)
    first, second = perturb(fresh_controlnet(base), 3), perturb(fresh_controlnet(base), 4)
    x, cond, image = inputs(batch=2)
    other_image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    inner = Controlled(base, first, image, strength=0.7)
    outer = Controlled(inner, second, other_image, strength=1.3)
    sigma = sigmas_for(arch)[3]
    with torch.inference_mode():
        r1, r2 = inner.residuals(x, sigma, cond), outer.residuals(x, sigma, cond)
        expected = base(x, sigma, {**cond, "control": add_control(r1, r2)})
        stacked = outer(x, sigma, cond)
        alone = inner(x, sigma, cond)
    assert torch.equal(stacked, expected)
    assert (stacked - alone).abs().max() > 1e-4
    assert outer.space == SPACE and {id(m) for m in outer.__nodegraph_modules__()} == {id(base), id(first), id(second)}


def test_wrong_channel_residuals_are_refused_with_a_clear_message() -> None:
    base = base_model("unet")
    wide = ControlNetUNet.from_unet(UNet(UNetConfig.from_name("tiny-test").replace(model_channels=16)),
                                    hint_widths=HINT)
    x, cond, image = inputs()
    with pytest.raises(ValueError, match="made for another U-Net"):
        Controlled(base, wide, image)
    with pytest.raises(ValueError, match="cannot control"):
        Controlled(base, fresh_controlnet(base_model("dit")), image)
    dit_base = base_model("dit")
    wide_dit = ControlNetDiT.from_dit(DiT(DiTConfig.from_name("tiny-test").replace(hidden_size=48)), 1,
                                      hint_widths=HINT)
    with pytest.raises(ValueError, match="hidden_size 48 != 32"):
        Controlled(dit_base, wide_dit, image)
    # Residuals that reach the network directly, or meet in a stack, are checked too.
    good = Controlled(base, fresh_controlnet(base), image).residuals(x, 1.0, cond)
    bad = {"down": [torch.zeros(1, 16, 16, 16)] + good["down"][1:], "mid": good["mid"]}
    with pytest.raises(ValueError, match=r"control\['down'\]\[0\] has shape \(1, 16, 16, 16\)"):
        base(x, 1.0, {**cond, "control": bad})
    with pytest.raises(ValueError, match=r"disagree on residual down\[0\]"):
        add_control(good, bad)


def test_controlnet_must_sit_inside_guidance() -> None:
    base = base_model("unet")
    x, cond, image = inputs()
    guided = Guided(base, {k: torch.zeros_like(v) for k, v in cond.items()}, 3.0)
    with pytest.raises(ValueError, match="before guidance"):
        Controlled(guided, fresh_controlnet(base), image)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_guidance_around_a_controlled_model_matches_the_by_hand_combination(mode) -> None:
    base = base_model("unet")
    controlled = Controlled(base, perturb(fresh_controlnet(base), 5), inputs()[2])
    x, cond, _ = inputs(batch=2)
    negative = {"tokens": torch.zeros(1, 3, 16), "mask": torch.ones(1, 3, dtype=torch.bool),
                "pooled": torch.zeros(1, 16)}
    with torch.inference_mode():
        guided = Guided(controlled, negative, 3.0, mode=mode)(x, 2.0, cond)
        d_cond = controlled(x, 2.0, cond)
        d_uncond = controlled(x, 2.0, {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()})
    assert (guided - (d_uncond + 3.0 * (d_cond - d_uncond))).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_folder_round_trip(tmp_path: Path, arch) -> None:
    controlnet = perturb(fresh_controlnet(base_model(arch)), 6)
    loaded = load_folder(save_folder(controlnet, tmp_path / arch))
    assert type(loaded) is type(controlnet) and loaded.config == controlnet.config
    assert loaded.config.space == SPACE
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x, cond, image = inputs()
    kwargs = {"pooled": cond["pooled"]} if arch == "dit" else {}
    with torch.inference_mode():
        a = controlnet(x, torch.tensor([500.0]), cond["tokens"], cond["mask"], hint=image, **kwargs)
        b = loaded(x, torch.tensor([500.0]), cond["tokens"], cond["mask"], hint=image, **kwargs)
    flat = (lambda r: r["down"] + [r["mid"]]) if arch == "unet" else (lambda r: [t for t in r if t is not None])
    # The tensors are bit-equal; outputs may differ in the last bit (alignment of the loaded storage picks kernels).
    assert all((p - q).abs().max() <= 1e-5 for p, q in zip(flat(a), flat(b)))


# ---------------------------------------------------------------------------------------------------------
# control image size policy
# ---------------------------------------------------------------------------------------------------------


def test_a_control_image_of_the_same_aspect_ratio_is_resized_with_a_warning() -> None:
    base = base_model("unet")
    controlnet = perturb(fresh_controlnet(base), 7)
    x, cond, _ = inputs()
    big = torch.rand(1, 3, 2 * SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(3))
    small = F.interpolate(big, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        with pytest.warns(ControlImageResized, match=f"{2 * SIZE}x{2 * SIZE} resized to {SIZE}x{SIZE}"):
            resized = Controlled(base, controlnet, big)(x, 1.0, cond)
        exact = Controlled(base, controlnet, small)(x, 1.0, cond)
    assert torch.equal(resized, exact)


def test_a_control_image_of_another_aspect_ratio_is_refused() -> None:
    base = base_model("unet")
    x, cond, _ = inputs()
    wide = torch.rand(1, 3, SIZE, 2 * SIZE)
    with torch.inference_mode(), pytest.raises(ValueError, match="another aspect ratio.*image.crop"):
        Controlled(base, fresh_controlnet(base), wide)(x, 1.0, cond)


def test_one_channel_control_images_and_batches() -> None:
    base = base_model("unet")
    controlnet = perturb(fresh_controlnet(base), 8)
    x, cond, _ = inputs(batch=2)
    grey = torch.rand(1, 1, SIZE, SIZE)
    with torch.inference_mode():
        a = Controlled(base, controlnet, grey)(x, 1.0, cond)
        b = Controlled(base, controlnet, grey.expand(2, 3, -1, -1))(x, 1.0, cond)
        with pytest.raises(ValueError, match="control image batch 3 does not divide the latent batch 2"):
            Controlled(base, controlnet, torch.rand(3, 3, SIZE, SIZE))(x, 1.0, cond)
    assert (a - b).abs().max() <= 1e-6  # one embedding repeated vs two computed: equal up to rounding


# ---------------------------------------------------------------------------------------------------------
# preprocessors
# ---------------------------------------------------------------------------------------------------------


def shapes_case(seed: int) -> tuple[torch.Tensor, np.ndarray, list[dict[str, Any]]]:
    sample = data.sample(seed)
    truth = np.zeros((data.CANVAS, data.CANVAS), bool)
    for o in sample.objects:
        truth |= data.shape_mask(o["shape"], o["x0"], o["y0"], o["side"])
    image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float() / 255
    return image, truth, sample.objects


@pytest.mark.parametrize("seed", range(6))
def test_object_mask_is_exactly_the_objects_pixels(seed) -> None:
    image, truth, objects = shapes_case(seed)
    out = object_mask(image)
    assert out["mask"].shape == (1, 1, 64, 64) and out["image"].shape == (1, 3, 64, 64)
    assert np.array_equal(out["mask"][0, 0].numpy() > 0.5, truth)
    by_colour = np.zeros_like(truth)
    for o in objects:
        colour = [v / 255 for v in data.PALETTE[o["color"]]]
        by_colour |= object_mask(image, method="color", color=colour)["mask"][0, 0].numpy() > 0.5
    assert np.array_equal(by_colour, truth)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_canny_edges_lie_on_object_boundaries(seed, blur) -> None:
    image, truth, _ = shapes_case(seed)
    t = torch.from_numpy(truth).float()[None, None]
    band = (F.max_pool2d(t, 3, 1, 1) + F.max_pool2d(-t, 3, 1, 1))[0, 0] > 0  # dilation minus erosion
    inner_boundary = (t[0, 0] > 0) & band
    edge = edges(image, blur=blur)
    assert edge.shape == (1, 3, 64, 64) and set(edge.unique().tolist()) <= {0.0, 1.0}
    on = edge[0, 0] > 0.5
    assert on.any() and not (on & ~band).any(), "an edge pixel off the objects' boundaries"
    near = F.max_pool2d(on.float()[None, None], 3, 1, 1)[0, 0] > 0
    assert (near & inner_boundary).sum() == inner_boundary.sum(), "a boundary pixel without an edge next to it"
    assert on.sum() <= 0.6 * band.sum(), "non-maximum suppression should thin the two-sided band"


def dilate(mask: np.ndarray) -> np.ndarray:
    return F.max_pool2d(torch.from_numpy(mask).float()[None, None], 3, 1, 1)[0, 0].numpy() > 0


@pytest.mark.parametrize("seed", range(4))
def test_canny_is_kornias_on_the_value_channel_and_agrees_with_scikit_image(seed) -> None:
    kornia = pytest.importorskip("kornia")
    image, _, _ = shapes_case(seed)
    value = image.amax(dim=1, keepdim=True)
    for blur, kernel in ((0.0, 1), (1.0, 7)):  # our scale is kornia's / 4; blur sigma -> a 2 ceil(3 sigma) + 1 kernel
        ours = edges(image, low=0.1, high=0.2, blur=blur)
        _, ref = kornia.filters.canny(value, 0.4, 0.8, kernel, (blur or 1.0, blur or 1.0))
        assert torch.equal(ours[:, :1], ref) and torch.equal(ours[:, 1], ours[:, 2])
    skimage = pytest.importorskip("skimage")  # an independent implementation: the same edges, within a pixel
    ours = edges(image, blur=1.0)[0, 0].numpy() > 0.5
    theirs = skimage.feature.canny(value[0, 0].double().numpy(), sigma=1.0, low_threshold=0.4, high_threshold=0.8,
                                   mode="nearest")
    assert ours.sum() > 20 and theirs.sum() > 20
    assert (ours & ~dilate(theirs)).sum() == 0 and (theirs & ~dilate(ours)).sum() == 0


def test_canny_finds_a_blue_edge_that_grey_conversion_loses() -> None:
    kornia = pytest.importorskip("kornia")
    image = torch.zeros(1, 3, 32, 32)
    image[:, 2, 8:24, 8:24] = 1.0  # a pure blue square on black: 0.11 in luma grey
    assert edges(image)[0, 0].sum() >= 4 * 14
    assert kornia.filters.canny(image, 0.4, 0.8, 1)[1].sum() == 0  # kornia's own RGB path (luma grey)


def test_sobel_magnitude_is_strong_on_boundaries_and_weak_elsewhere() -> None:
    image, truth, _ = shapes_case(0)
    t = torch.from_numpy(truth).float()[None, None]
    band = (F.max_pool2d(t, 3, 1, 1) + F.max_pool2d(-t, 3, 1, 1))[0, 0] > 0
    mag = edges(image, method="sobel")[0, 0]
    assert mag.min() >= 0 and mag.max() <= 1
    assert mag[~band].max() < 0.1 and mag[band].mean() > 0.4


# ---------------------------------------------------------------------------------------------------------
# through the Engine
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    reg = default_registry().copy()
    if "control.apply" not in reg:
        reg.add_module(nodes.control, "builtin-control")
    return reg


PATHS_ALLOWED = ModelRoots(allow_paths=True)  # the tiny models live in tmp folders, named by absolute path


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory, tiny_models) -> dict[str, str]:
    root = tmp_path_factory.mktemp("controlnets")
    out = {}
    for arch in ARCHS:
        base = load_folder(getattr(tiny_models, arch))
        cn = perturb(fresh_controlnet(DenoiserModel(base, DenoiserInfo())), 10)
        out[arch] = str(save_folder(cn, root / arch))
    cn = load_folder(out["unet"])
    out["other"] = str(save_folder(ControlNetUNet(cn.config.replace(space="other-space")), root / "other"))
    return out


def controlled_graph(models, folder: str, arch: str = "unet", mode: str = "batched", control: bool = True,
                     end: float = 0.75, sampler: str | None = None) -> dict[str, Any]:
    sampler = sampler or ("flow_euler" if arch == "dit" else "euler")
    graph = txt2img_graph(models, sampler, arch=arch, mode=mode)
    if not control:
        return graph
    graph["nodes"].update({
        "cn": {"type": "model.load_controlnet", "inputs": {"path": folder}},
        "shapes": {"type": "shapes.generate", "inputs": {"seed": 1, "count": 1}},
        "small": {"type": "image.resize", "inputs": {"image": link("shapes", "images"), "width": SIZE,
                                                     "height": SIZE}},
        "hint": {"type": "control.object_mask", "inputs": {"image": link("small", "image")}},
        "control": {"type": "control.apply", "inputs": {
            "model": link("unet"), "controlnet": link("cn", "controlnet"), "image": link("hint", "image"),
            "sigmas": link("sched"), "strength": 1.0, "start": 0.0, "end": end}},
    })
    graph["nodes"]["guided"]["inputs"]["model"] = link("control", "model")
    return graph


@pytest.mark.parametrize("arch, sampler", [("unet", "euler"), ("unet", "heun"), ("dit", "flow_euler")])
def test_txt2img_with_controlnet_in_the_engine_and_cfg_modes_agree(tmp_path, registry, tiny_models,
                                                                   controlnet_folders, arch, sampler) -> None:
    engine = Engine(registry, device="cpu", input_root=tmp_path, output_root=tmp_path, model_roots=PATHS_ALLOWED)
    folder = controlnet_folders[arch]

    def run(mode: str, control: bool = True, outputs: tuple[str, ...] = ("latent",)) -> dict[str, Any]:
        graph = controlled_graph(tiny_models, folder, arch, mode, control, sampler=sampler)
        return engine.run(graph, outputs=list(outputs)).outputs

    batched, sequential, plain = run("batched", outputs=("latent", "image")), run("sequential"), run("batched", False)
    assert batched["image"].shape == (1, 3, SIZE, SIZE) and torch.isfinite(batched["image"]).all()
    assert (batched["latent"] - sequential["latent"]).abs().max() <= 1e-5
    assert (batched["latent"] - plain["latent"]).abs().max() > 1e-3, "the ControlNet did nothing"


def test_controlnet_space_is_checked_at_validation(tmp_path, registry, tiny_models, controlnet_folders) -> None:
    engine = Engine(registry, device="cpu", input_root=tmp_path, output_root=tmp_path, model_roots=PATHS_ALLOWED)
    assert engine.validate(controlled_graph(tiny_models, controlnet_folders["unet"])).ok
    result = engine.validate(controlled_graph(tiny_models, controlnet_folders["other"]))
    assert not result.ok
    assert any(i.node == "control" and "other-space" in i.message for i in result.issues), result.issues
    bad_end = controlled_graph(tiny_models, controlnet_folders["unet"])
    bad_end["nodes"]["control"]["inputs"]["end"] = 1.5
    assert not engine.validate(bad_end).ok


@pytest.mark.parametrize("arch", ARCHS)
def test_residuals_are_differentiable_for_training(arch) -> None:
    """What training will do: frozen base, per-sample sigmas and control images, gradients reach the ControlNet."""
    base = base_model(arch).requires_grad_(False)
    controlnet = fresh_controlnet(base).train()
    x, cond, _ = inputs(batch=2)
    images = torch.rand(2, 3, SIZE, SIZE)
    sigma = torch.tensor([0.3, 0.8]) if arch == "dit" else torch.tensor([0.5, 4.0])
    controlled = Controlled(base, controlnet, images)
    out = controlled(x, sigma, cond)
    out.square().mean().backward()
    zero = controlnet.mid_out if arch == "unet" else controlnet.zero_linears[0]
    assert zero.weight.grad is not None and zero.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
