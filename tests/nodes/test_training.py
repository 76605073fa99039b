"""Training of the tiny-shapes family: trainers reduce their loss on tiny presets, and the diffusion loss
uses exactly the parameterisation the engine's ``DenoiserModel`` samples with."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodegraph import Engine
from nodes.adapters import DenoiserInfo, DenoiserModel, check_pair
from nodes.diffusion.parameterization import c_in, model_timestep, noised, to_denoised, training_target
from nodes.models.config import load_folder, save_folder
from nodes.models.dit import DiT, DiTConfig
from nodes.models.text import TextConfig, TextEncoder
from nodes.models.unet import UNet, UNetConfig
from nodes.models.vae import AutoencoderKL, VAEConfig
from nodes.shapes import data, evaluate
from nodes.shapes_nodes import image_to_uint8
from nodes.training.common import EMA, Budget, CaptionTable, adamw, encode_captions, make_dataset, set_lr
from nodes.training.denoiser import (
    diffusion_loss, draw_batch, generate, sample_sigmas, train_denoiser, train_denoiser_parallel,
)
from nodes.training.family import parse_args, retrain_denoiser
from nodes.training.vae import latent_scaling, train_vae, vae_loss

INFOS = {
    "flow": DenoiserInfo("flow", "sd3", "tiny-test"),
    "v": DenoiserInfo("v", "sd15", "tiny-test"),
    "eps": DenoiserInfo("eps", "sd15", "tiny-test"),
    "x0": DenoiserInfo("x0", "improved_ddpm", "tiny-test"),
}
CAPTIONS = ["a red circle on the left", "two blue squares", "a green triangle above a white circle", ""]


def tiny_text(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(TextConfig.from_name("tiny-test"))


def tiny_net(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DiT(DiTConfig.from_name("tiny-test")) if arch == "dit" else UNet(UNetConfig.from_name("tiny-test"))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight random (zero-initialised output layers included), so outputs depend on all inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else p[0].numel() ** -0.5))
    return model.eval()


def batch_of(model: DenoiserModel, n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=gen)
    return x0, torch.randn(x0.shape, generator=gen), sample_sigmas(model, n, gen)


# --- parameterisation: the training loss matches the adapter ----------------------------------------


class Oracle(nn.Module):
    """A "network" that returns a fixed output and records the inputs the adapter gave it."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output, self.weight = output, nn.Parameter(torch.zeros(()))
        self.seen: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        self.seen = (x.clone(), t.clone())
        return self.output


@pytest.mark.parametrize("kind", list(INFOS))
def test_training_target_denoises_to_x0_through_the_adapter(kind: str) -> None:
    probe = DenoiserModel(Oracle(torch.zeros(())), INFOS[kind])
    x0, noise, sigma = batch_of(probe)
    x = noised(kind, x0, noise, sigma)
    target = training_target(kind, x0, noise, sigma)
    torch.testing.assert_close(to_denoised(kind, target, x, sigma), x0, atol=1e-4, rtol=1e-4)
    # A network that outputs exactly the training target makes the engine's adapter return x0 ...
    oracle = Oracle(target)
    model = DenoiserModel(oracle, INFOS[kind])
    cond = {"tokens": torch.zeros(4, 3, 16), "mask": torch.ones(4, 3, dtype=torch.bool)}
    torch.testing.assert_close(model(x, sigma, cond), x0, atol=1e-4, rtol=1e-4)
    # ... from the scaled sample and the training timestep ...
    train_sigmas = model.train_sigmas if model.train_sigmas.numel() else None
    seen_x, seen_t = oracle.seen
    torch.testing.assert_close(seen_x, x * c_in(kind, sigma).view(-1, 1, 1, 1))
    torch.testing.assert_close(seen_t, model_timestep(kind, sigma, train_sigmas, "log", 1000))
    # ... and the training loss, through the same network call, is zero for it.
    assert float(diffusion_loss(model, x0, noise, sigma, cond)) == 0.0


@pytest.mark.parametrize("arch,kind", [("dit", "flow"), ("unet", "v"), ("unet", "eps"), ("dit", "x0")])
def test_one_network_call_path_for_sampling_and_training(arch: str, kind: str) -> None:
    """``forward`` is ``to_denoised`` of ``network_output``, which is ``call_network`` of ``network_inputs``; the
    network gets the pooled vector exactly when it declares ``takes_pooled`` (the DiT)."""
    model = DenoiserModel(randomize(tiny_net(arch)), INFOS[kind])
    assert model.takes_pooled == (arch == "dit")
    x0, noise, sigma = batch_of(model)
    x = noised(kind, x0, noise, sigma)
    cond = encode_captions(randomize(tiny_text()), CAPTIONS)
    x_in, t, kwargs = model.network_inputs(x, sigma, cond)
    assert sorted(kwargs) == sorted(["context", "context_mask"] + (["pooled"] if arch == "dit" else []))
    assert kwargs["context"] is cond["tokens"] and t.shape == (4,)
    with torch.no_grad():
        out = model.call_network(x_in, t, kwargs)
        assert torch.equal(model.network_output(x, sigma, cond), out)
        assert torch.equal(model(x, sigma, cond), to_denoised(kind, out, x, sigma))
        loss = diffusion_loss(model, x0, noise, sigma, cond)
    assert torch.equal(loss, F.mse_loss(out, training_target(kind, x0, noise, sigma)))


def test_noise_levels_cover_the_training_range() -> None:
    gen = torch.Generator().manual_seed(0)
    flow = sample_sigmas(DenoiserModel(Oracle(torch.zeros(())), INFOS["flow"]), 2000, gen, flow_shift=3.0)
    # logit-normal(0, 1) shifted by the sd3 schedule's 3: the median 0.5 moves to 3 * 0.5 / (1 + 2 * 0.5).
    assert 0 < float(flow.min()) and float(flow.max()) < 1 and abs(float(flow.median()) - 0.75) < 0.03
    vp = DenoiserModel(Oracle(torch.zeros(())), INFOS["v"])
    sigmas = sample_sigmas(vp, 2000, gen)
    lo, hi = float(vp.train_sigmas[0]), float(vp.train_sigmas[-1])
    assert lo * 0.999 <= float(sigmas.min()) < 0.2 and 10 < float(sigmas.max()) <= hi * 1.001


# --- trainers reduce their loss ---------------------------------------------------------------------


def test_vae_trainer_reduces_loss() -> None:
    images, _ = make_dataset(0, 8)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.from_name("tiny-test"))
    x = data.to_tensor(images)
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = float(vae_loss(vae, x, noise, 1e-4))
    record = train_vae(vae, images, Budget(5.0, 25), batch=8, lr=3e-3, log=lambda _: None)
    with torch.no_grad():
        after = float(vae_loss(vae, x, noise, 1e-4))
    assert record["steps"] == 25 and after < 0.7 * before


@pytest.mark.parametrize("arch,kind,train_text", [("dit", "flow", True), ("unet", "v", False)])
def test_denoiser_trainer_reduces_loss(arch: str, kind: str, train_text: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen).repeat(4, 1, 1, 1)
    captions = CAPTIONS * 4
    model, text = DenoiserModel(tiny_net(arch), INFOS[kind]), tiny_text()
    x0, noise, sigma = batch_of(model, n=16, seed=1)
    x0 = latents

    def loss() -> float:
        with torch.no_grad():
            return float(diffusion_loss(model, x0, noise, sigma, encode_captions(text, captions)))

    before = loss()
    text_before = [p.clone() for p in text.parameters()]
    record, ema, text_ema = train_denoiser(model, text, latents, captions, Budget(5.0, 50), train_text=train_text,
                                           batch=16, lr=3e-3, text_lr=1e-3, warmup=5,
                                           log=lambda _: None)
    assert record["steps"] == 50 and loss() < 0.9 * before
    text_changed = any(not torch.equal(a, b) for a, b in zip(text_before, text.parameters()))
    assert text_changed == train_text and (text_ema is not None) == train_text
    assert not torch.equal(next(ema.model.parameters()), next(model.net.parameters()))


def test_parallel_training_takes_the_averaged_gradient_step() -> None:
    """Two spawned processes, one half-batch each: the weights are those of single-process updates on the mean
    of both halves' gradients, each half drawn from its rank's stream (rank 0's is the single-process one)."""
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions, text = CAPTIONS * 2, randomize(tiny_text())
    options = {"batch": 4, "lr": 1e-2, "warmup": 1, "drop": 0.25, "flow_shift": 3.0, "seed": 5, "ema_decay": 0.9}
    model = DenoiserModel(randomize(tiny_net("dit")), INFOS["flow"])
    start = copy.deepcopy(model.net)  # the reference's weights, taken before training moves model.net
    record, ema = train_denoiser_parallel(model, text, latents, captions, Budget(5.0, 3), 2, verbose=False,
                                          **options)
    assert record["steps"] == 3 and record["processes"] == 2

    ref = DenoiserModel(start, INFOS["flow"])
    ref.net.train()
    table = CaptionTable(text, captions)
    opt = adamw(list(ref.net.parameters()), options["lr"])
    gens = [torch.Generator().manual_seed(5 + 7919 * rank) for rank in (0, 1)]
    ref_ema = EMA(ref.net, options["ema_decay"])
    for step in range(3):
        grads = []
        for gen in gens:
            x0, noise, sigma, caps = draw_batch(ref, latents, captions, 2, options["drop"], gen, 3.0)
            ref.net.zero_grad()
            diffusion_loss(ref, x0, noise, sigma, table(caps)).backward()
            grads.append([p.grad.clone() for p in ref.net.parameters()])
        for p, a, b in zip(ref.net.parameters(), *grads):
            p.grad = (a + b) / 2
        nn.utils.clip_grad_norm_(list(ref.net.parameters()), 1.0)
        set_lr(opt, step, 1)
        opt.step()
        ref_ema.update(ref.net)
    for got, want in zip(model.net.state_dict().values(), ref.net.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(ema.model.state_dict().values(), ref_ema.model.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(model.net.parameters(), randomize(tiny_net("dit")).parameters()))


# --- helpers ----------------------------------------------------------------------------------------


def test_caption_table_matches_encoding() -> None:
    text = randomize(tiny_text())
    table = CaptionTable(text, CAPTIONS[:3] * 2)
    got, want = table(["", CAPTIONS[1], CAPTIONS[0]]), encode_captions(text, ["", CAPTIONS[1], CAPTIONS[0]])
    for key in ("tokens", "pooled", "mask"):
        torch.testing.assert_close(got[key], want[key])


def test_ema_warms_up_then_tracks() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # decay min(0.9, 2 / 11)
    expected = net.weight - (2 / 11) * 1.0
    torch.testing.assert_close(ema.model.weight, expected)


def test_learning_rate_warms_up_holds_then_decays_over_the_budgets_end() -> None:
    opt = adamw([nn.Parameter(torch.zeros(1))], 2.0)

    def lr(step: int, progress: float, decay: float = 0.25) -> float:
        set_lr(opt, step, 10, progress, decay)
        return opt.param_groups[0]["lr"]

    assert lr(4, 0.0) == 1.0 and lr(50, 0.5) == 2.0 and lr(50, 0.75) == 2.0
    assert lr(50, 0.875) == 1.0 and lr(50, 1.0) == 0.0 and lr(50, 0.875, decay=0.0) == 2.0
    budget = Budget(minutes=1e6, max_steps=40)
    assert budget.progress(10, time.perf_counter()) == 0.25 and budget.done(40, time.perf_counter())


def test_latent_scaling_normalises() -> None:
    means = torch.randn(64, 4, 4, 4) * 3 + 0.5
    shift, scale = latent_scaling(means)
    scaled = (means - shift) * scale
    assert abs(float(scaled.mean())) < 1e-5 and abs(float(scaled.std()) - 1) < 1e-5


def test_generate_runs_the_engine_parameterisation() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.from_name("tiny-test")).eval()
    text = tiny_text().eval()
    for arch, kind in (("dit", "flow"), ("unet", "v")):
        model = DenoiserModel(tiny_net(arch).eval(), INFOS[kind])
        images = generate(model, text, vae, CAPTIONS[:2], scale=3.0, steps=2)
        assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_retraining_one_denoiser_keeps_the_family_and_its_records(tmp_path: Path) -> None:
    """``--only dit`` loads the family's VAE and text encoder, writes only ``dit/``, and replaces only the DiT's
    record in ``training.json``."""
    family = tmp_path / "family"
    torch.manual_seed(0)
    save_folder(AutoencoderKL(VAEConfig.from_name("shapes").replace(space="tiny-shapes")), family / "vae")
    save_folder(TextEncoder(TextConfig.from_name("shapes")), family / "text")
    (family / "training.json").write_text(json.dumps({"command": "old", "models": {"vae": {"bytes": 1},
                                                                                  "dit": {"steps": 999}}}))
    args = parse_args(["--only", "dit", "--family", str(family), "--out", str(family), "--samples", "16",
                       "--steps-dit", "2", "--batch-dit", "4", "--eval", "0", "--dtype", "float32"])
    record = retrain_denoiser(args, log=lambda _: None)
    report = json.loads((family / "training.json").read_text())
    assert report["command"] == "old" and report["models"]["vae"] == {"bytes": 1}
    assert report["models"]["dit"]["steps"] == 2 == record["steps"]
    assert report["models"]["dit"]["command"].startswith("python -m nodes.training --only dit")
    assert sorted(p.name for p in family.iterdir()) == ["dit", "text", "training.json", "vae"]
    dit = load_folder(family / "dit", dtype="float32")
    assert isinstance(dit, DiT) and DenoiserInfo.read(family / "dit").prediction == "flow"
    # The default recipe: the pooled caption as 4 cross-attention tokens, without the byte tokens.
    assert (dit.config.pooled_tokens, dit.config.text_tokens, dit.config.mix_ffn) == (4, False, True)
    with pytest.raises(SystemExit):
        parse_args(["--family", str(family)])  # --family without --only


# --- the shipped family -----------------------------------------------------------------------------

WEIGHTS = Path(__file__).resolve().parents[2] / "nodes" / "weights" / "tiny-shapes"


def test_shipped_family_loads_and_fits_together() -> None:
    folders = {name: WEIGHTS / name for name in ("vae", "text", "dit", "unet", "controlnet_unet", "controlnet_dit")}
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())  # every shipped file, JSON included
    assert total <= 25_000_000
    vae, text = load_folder(folders["vae"], dtype="float32"), load_folder(folders["text"], dtype="float32")
    assert vae.config.space == "tiny-shapes" and vae.config.downsample_factor == 4
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 1.0
    for name, kind, schedule in (("dit", "flow", "sd3"), ("unet", "v", "sd15")):
        info = DenoiserInfo.read(folders[name])
        assert (info.prediction, info.train_schedule, info.latent_space) == (kind, schedule, "tiny-shapes")
        net = load_folder(folders[name], dtype="float32")
        assert net.config.context_dim == text.config.width
        controlnet = load_folder(folders[f"controlnet_{name}"], dtype="float32")
        assert controlnet.config.space == "tiny-shapes" and controlnet.config.hint_factor == 4
        check_pair(controlnet, net)  # the ControlNet was trained for this denoiser's architecture
    report = json.loads((WEIGHTS / "training.json").read_text())
    assert {"vae", "text", "dit", "unet"} <= set(report["models"])
    assert report["models"]["vae"]["reconstruction"]["accuracy"] >= 0.98


@pytest.mark.parametrize("graph", ["txt2img.json", "txt2img_unet.json"])
def test_shipped_txt2img_graphs_draw_the_caption_and_take_any_text(graph: str, tmp_path: Path) -> None:
    """Through the main job's graphs: grammar captions come out as the detector reads them (the main job's seed 1),
    and text outside the grammar still gives a finite 64 x 64 image."""
    engine = Engine(device="cpu", input_root=WEIGHTS.parents[2] / "graphs", output_root=tmp_path)
    spec = json.loads((WEIGHTS.parents[2] / "graphs" / graph).read_text())

    def image(text: str) -> torch.Tensor:
        return engine.run(spec, overrides={"prompt.text": text, "noise.seed": 1}, outputs=["image"]).outputs["image"]

    captions = ["a red circle on the left", "a large blue square", "a yellow triangle at the top",
                "a green circle left of a white square", "a purple square above a red triangle", "two blue circles"]
    correct = [evaluate.score(image_to_uint8(image(c))[0], c)["correct"] for c in captions]
    # Both graphs get 80-85 % of the benchmark's captions fully right; one whose prompt does not reach the
    # denoiser, or that decodes the wrong latent scale, gets none of these. (At seed 1 the DiT gets 6, the U-Net 4.)
    assert sum(correct) >= 4, dict(zip(captions, correct))
    for text in ["", "ünïcødé ✓ 漢字 🙂", "a dragon " * 20, "two red circles left of a blue square above it"]:
        out = image(text)
        assert out.shape == (1, 3, 64, 64) and bool(torch.isfinite(out).all()), text
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
