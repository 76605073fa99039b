"""Every graph-defined sampler (``sample.*``: a loop over sigma pairs, body = denoise + a step node) gives
bit-identical output to the same sampler written as a plain Python loop (:mod:`nodes.diffusion.reference`),
on CPU, with the tiny random-weight U-Net (v-prediction, plus an eps copy for two cases; the DiT for flow
matching) loaded through the model nodes.

The reference replays the run with the very objects the engine used (the loaded ``DenoiserModel`` wrapped by
``guidance.cfg``, the encoded conditioning, the scheduled sigmas, the noised start latent) and with the
per-step noise that ``noise.step`` derives from ``(seed, index)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from nodes.diffusion import reference
from tests.nodes.conftest import STEPS, TinyModels, txt2img_graph

STEP_SEED = 7

# (case id, graph-defined sampler, architecture, eta passed to the node / reference loop)
CASES = [
    ("euler", "euler", "unet", None),
    ("euler_ancestral", "euler_ancestral", "unet", None),
    ("ddpm", "ddpm", "unet", None),
    ("ddim_eta0", "ddim", "unet", 0.0),
    ("ddim_eta0.5", "ddim", "unet", 0.5),
    ("heun", "heun", "unet", None),
    ("dpmpp_2m", "dpmpp_2m", "unet", None),
    ("flow_euler", "flow_euler", "dit", None),
    ("euler_eps", "euler", "unet_eps", None),
    ("ddpm_eps", "ddpm", "unet_eps", None),
]
STOCHASTIC = {"euler_ancestral", "ddpm", "ddim_eta0.5"}


def step_noise(like: Tensor, seed: int, index: int) -> Tensor:
    """What ``noise.step`` gives for (seed, index), written out independently of the node."""
    gen = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(like.shape, generator=gen, dtype=torch.float32)


def replay(sampler: str, outputs: dict[str, Any], eta: float | None, seed: int = STEP_SEED) -> Tensor:
    """The plain-loop reference run with the engine's own model, conditioning, sigmas and start latent."""
    sigmas, start = outputs["sigmas"], outputs["start"]
    noises = [step_noise(start, seed, i) for i in range(len(sigmas) - 1)]
    kwargs = {} if eta is None else {"eta": eta}
    with torch.inference_mode():
        return reference.SAMPLERS[sampler](outputs["model"], start.clone(), sigmas, outputs["cond"], noises=noises,
                                           **kwargs)


def run(engine, models: TinyModels, sampler: str, arch: str, eta: float | None, **kw: Any) -> dict[str, Any]:
    graph = txt2img_graph(models, sampler, arch=arch, eta=eta, step_seed=kw.pop("step_seed", STEP_SEED), **kw)
    return engine.run(graph, outputs=["latent", "model", "cond", "sigmas", "start"]).outputs


@pytest.mark.parametrize("case, sampler, arch, eta", CASES, ids=[c[0] for c in CASES])
def test_graph_sampler_is_bit_identical_to_the_plain_loop(engine, tiny_models, case, sampler, arch, eta) -> None:
    out = run(engine, tiny_models, sampler, arch, eta)
    assert len(out["sigmas"]) == STEPS + 1 and float(out["sigmas"][-1]) == 0.0
    assert type(out["model"]).__name__ == "Guided"  # the replay goes through the same CFG wrapper
    expected = replay(sampler, out, eta)
    latent = out["latent"]
    assert latent.shape == out["start"].shape == (1, 4, 16, 16)
    assert torch.isfinite(latent).all()
    assert not torch.equal(latent, out["start"]), "the sampler did not move the latent"
    assert torch.equal(latent, expected), (
        f"sample.{sampler} differs from the plain loop: max abs diff {(latent - expected).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("case, sampler, arch, eta", [c for c in CASES if c[0] in STOCHASTIC],
                         ids=sorted(STOCHASTIC))
def test_stochastic_samplers_use_the_seeded_per_step_noise(engine, tiny_models, case, sampler, arch, eta) -> None:
    """The step seed matters, and the replay with another seed's noise does not match: the noise is (seed, index)."""
    a = run(engine, tiny_models, sampler, arch, eta, step_seed=STEP_SEED)
    b = run(engine, tiny_models, sampler, arch, eta, step_seed=STEP_SEED + 1)
    assert torch.equal(a["start"], b["start"])
    assert not torch.equal(a["latent"], b["latent"])
    assert torch.equal(b["latent"], replay(sampler, b, eta, seed=STEP_SEED + 1))
    assert not torch.equal(b["latent"], replay(sampler, b, eta, seed=STEP_SEED))


def test_deterministic_samplers_ignore_the_step_seed(engine, tiny_models) -> None:
    """DDIM with eta 0 is the ODE step: its (seeded) noise input must not reach the result."""
    a = run(engine, tiny_models, "ddim", "unet", 0.0, step_seed=1)
    b = run(engine, tiny_models, "ddim", "unet", 0.0, step_seed=2)
    assert torch.equal(a["latent"], b["latent"])


def test_ddim_eta0_equals_euler_on_the_same_sigmas(engine, tiny_models) -> None:
    """In sigma space DDIM(eta=0) is Euler: the plain Euler loop over DDIM's sigmas reproduces sample.ddim."""
    out = run(engine, tiny_models, "ddim", "unet", 0.0)
    with torch.inference_mode():
        euler = reference.sample_euler(out["model"], out["start"].clone(), out["sigmas"], out["cond"])
    assert torch.equal(out["latent"], euler)


def test_graph_sampler_without_guidance_matches_the_plain_loop_on_the_bare_model(engine, tiny_models) -> None:
    graph = txt2img_graph(tiny_models, "dpmpp_2m", guidance=False)
    out = engine.run(graph, outputs=["latent", "model", "cond", "sigmas", "start"]).outputs
    assert type(out["model"]).__name__ == "DenoiserModel"
    assert torch.equal(out["latent"], replay("dpmpp_2m", out, None))
