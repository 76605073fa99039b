"""ComfyUI's schedulers and samplers as our nodes (``schedule.comfy``, ``sample.*``), checked against k-diffusion.

Schedulers: every ComfyUI scheduler on the SD training sigmas equals the same computation written out here from
ComfyUI's definitions (bit for bit, float32), karras / exponential equal k-diffusion's ``get_sigmas_*``, and
``schedule.comfy`` adds KSampler's ``denoise`` and discard-the-next-to-last-sigma rules.

Samplers: each graph-defined sampler, run by the engine over every scheduler's sigmas with a tiny random x0
network (``DenoiserModel``, SD training sigmas), equals k-diffusion's ``sample_*`` run with the same model,
sigmas, start latent and noise (max abs diff <= 1e-4, float32). The noise maps as ComfyUI seeds it:

* ancestral samplers, DDPM, LCM (``noise.sequential``): the k-th draw of one CPU generator seeded with the seed,
  what ComfyUI's ``default_noise_sampler(x, seed)`` gives, passed to k-diffusion as ``noise_sampler``;
* SDE samplers (``noise.brownian``): k-diffusion's own ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max,
  seed)``, the class ComfyUI uses (k-diffusion asks it at ``exp(log sigma)``, an ulp off the schedule's sigma,
  which moves a Brownian increment by ~1e-3: its queries are snapped back to the schedule);
* the existing ``sample.euler_ancestral`` / ``sample.ddpm`` draw ``noise.step(seed, index)``, replayed in order.

k-diffusion (PyPI 0.1.1) has no DDPM, LCM or UniPC: those are checked against reference loops written here from
the papers with ComfyUI's choices, and ComfyUI's LMS returns the x0 prediction on the step to 0 where
k-diffusion takes an LMS step, so k-diffusion's LMS runs to the last-but-one sigma followed by one denoise (its
quadrature fed float64 sigmas; ours integrates the Lagrange polynomials exactly).
k-diffusion's ``sampling`` module is loaded without its package (whose ``__init__`` imports torchvision).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

for _dep in ("scipy", "torchsde", "torchdiffeq", "tqdm"):
    pytest.importorskip(_dep)

import nodes
from nodegraph import Engine, Registry, node
from nodegraph import types as T
from nodes.adapters import DenoiserInfo, DenoiserModel
from nodes.diffusion import comfy
from nodes.diffusion.noise import brownian_noise, sequential_noise
from nodes.diffusion.schedules import PRESETS, sigma_to_timestep

TRAIN = PRESETS["sd15"].train_sigmas()
SEED, STEPS, SHAPE = 5, 6, (2, 4, 8, 8)
SCHEDULERS = list(comfy.SCHEDULERS)


def load_k_diffusion_sampling() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed", allow_module_level=True)
    pkg, utils = types.ModuleType("_kdiff"), types.ModuleType("_kdiff.utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.setdefault("_kdiff", pkg)
    sys.modules.setdefault("_kdiff.utils", utils)
    path = Path(spec.submodule_search_locations[0]) / "sampling.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_kdiff.sampling", path))
    module.__spec__.loader.exec_module(module)
    return module


K = load_k_diffusion_sampling()


# ------------------------------------------------------------------------------ ComfyUI's schedulers, restated
def ref_sigma(t: float) -> float:
    """sigma(t): log-sigma interpolated between floor and ceil, float32."""
    log_sigmas = TRAIN.log()
    t = torch.tensor(t, dtype=torch.float32).clamp(0, 999)
    lo, hi, w = int(t.floor()), int(t.ceil()), t - t.floor()
    return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())


def ref_timestep(sigma: float) -> int:
    """timestep(sigma): the index of the nearest training sigma in log-sigma."""
    dists = [abs(float(torch.tensor(sigma).log() - ls)) for ls in TRAIN.log()]
    return int(np.argmin(dists))


def ref_schedule(name: str, n: int) -> torch.Tensor:
    smin, smax, count = float(TRAIN[0]), float(TRAIN[-1]), len(TRAIN)
    if name in ("normal", "sgm_uniform"):
        start, end = ref_timestep(smax), ref_timestep(smin)
        ts = (torch.linspace(start, end, n + 1)[:-1] if name == "sgm_uniform" else torch.linspace(start, end, n))
        out = [ref_sigma(float(t)) for t in ts] + [0.0]
    elif name == "karras":
        ramp = torch.linspace(0, 1, n)
        out = ((smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7).tolist() + [0.0]
    elif name == "exponential":
        out = torch.linspace(math.log(smax), math.log(smin), n).exp().tolist() + [0.0]
    elif name == "simple":
        out = [float(TRAIN[-(1 + int(i * (count / n)))]) for i in range(n)] + [0.0]
    elif name == "ddim_uniform":
        out, i = [0.0], 1
        while i < count:
            out.append(float(TRAIN[i]))
            i += max(count // n, 1)
        out = out[::-1]
    elif name == "beta":
        from scipy.stats import beta

        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (count - 1))
        out = [float(TRAIN[int(t)]) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]] + [0.0]
    elif name == "linear_quadratic":
        half = n // 2
        diff = half - 0.025 * n
        quad = diff / (half * (n - half) ** 2)
        lin = 0.025 / half - 2 * diff / (n - half) ** 2
        sched = [i * 0.025 / half for i in range(half)]
        sched += [quad * i**2 + lin * i + quad * half**2 for i in range(half, n)] + [1.0]
        return torch.tensor([1.0 - v for v in sched]) * TRAIN[-1]
    elif name == "kl_optimal":
        w = torch.arange(n, dtype=torch.float32) / (n - 1)
        out = (w * math.atan(smin) + (1 - w) * math.atan(smax)).tan().tolist() + [0.0]
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_equal_comfyui_definitions(name: str) -> None:
    for n in (2, 5, 20, 30, 33):
        ours = comfy.scheduler_sigmas(TRAIN, name, n)
        expected = ref_schedule(name, n)
        assert ours.dtype == torch.float32 and torch.equal(ours, expected), (name, n, ours, expected)
        assert (ours[:-1].diff() < 0).all() and ours[-1] == 0


def test_karras_and_exponential_equal_k_diffusion() -> None:
    smin, smax = float(TRAIN[0]), float(TRAIN[-1])
    for n in (1, 7, 25):
        assert torch.equal(comfy.scheduler_sigmas(TRAIN, "karras", n), K.get_sigmas_karras(n, smin, smax))
        assert torch.equal(comfy.scheduler_sigmas(TRAIN, "exponential", n), K.get_sigmas_exponential(n, smin, smax))


def test_step_counts_are_comfyui_s() -> None:
    assert len(comfy.scheduler_sigmas(TRAIN, "ddim_uniform", 30)) == 32  # 1000 // 30 = 33 apart: 31 steps
    beta = comfy.scheduler_sigmas(TRAIN, "beta", 300)  # repeated timesteps near the ends dropped: 293 steps
    assert len(beta) == 294 and torch.equal(beta, ref_schedule("beta", 300))
    assert len(comfy.scheduler_sigmas(TRAIN, "normal", 1)) == 2
    with pytest.raises(ValueError, match="valid: normal"):
        comfy.scheduler_sigmas(TRAIN, "nope", 10)


def test_nearest_timestep_rule() -> None:
    probe = torch.cat([TRAIN[[0, 1, 500, 999]], torch.tensor([0.5, 1.0, 3.0, 14.0, 100.0, 1e-4])])
    got = sigma_to_timestep(probe, TRAIN, "nearest")
    assert got.tolist() == [float(ref_timestep(float(s))) for s in probe]
    assert got[:4].tolist() == [0.0, 1.0, 500.0, 999.0]


def test_ksampler_denoise_and_discard_rules() -> None:
    full = comfy.scheduler_sigmas(TRAIN, "karras", 33)
    assert torch.equal(comfy.ksampler_sigmas(TRAIN, 20, "karras", denoise=0.6), full[-21:])  # int(20 / 0.6) = 33
    assert torch.equal(comfy.ksampler_sigmas(TRAIN, 20, "normal"), comfy.scheduler_sigmas(TRAIN, "normal", 20))
    one_more = comfy.scheduler_sigmas(TRAIN, "normal", 21)
    dropped = torch.cat([one_more[:-2], one_more[-1:]])
    assert torch.equal(comfy.ksampler_sigmas(TRAIN, 20, "normal", sampler="uni_pc"), dropped)
    one_more = comfy.scheduler_sigmas(TRAIN, "simple", 41)
    assert torch.equal(comfy.ksampler_sigmas(TRAIN, 20, "simple", 0.5, "dpm_2"),
                       torch.cat([one_more[:-2], one_more[-1:]])[-21:])
    with pytest.raises(ValueError):
        comfy.ksampler_sigmas(TRAIN, 20, "normal", denoise=0.0)


# ------------------------------------------------------------------------------------------------- noise
def test_sequential_noise_is_comfyui_s_seeded_stream() -> None:
    """ComfyUI seeds its sampler's generator with the KSampler seed: draw 0 is the initial noise itself."""
    gen = torch.manual_seed(SEED)
    expected = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    state, got = None, []
    for _ in range(4):
        noise, state = sequential_noise(SHAPE, SEED, state)
        got.append(noise)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_brownian_noise_is_the_brownian_tree_sampler() -> None:
    sigmas = comfy.scheduler_sigmas(TRAIN, "karras", 8)
    x = torch.zeros(SHAPE)
    sampler = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEED)
    for a, b in [(sigmas[0], sigmas[1]), (sigmas[3], sigmas[4]), (sigmas[2], (sigmas[2] * sigmas[3]).sqrt())]:
        assert torch.equal(brownian_noise(SHAPE, SEED, sigmas, a, b), sampler(a, b))
    assert not brownian_noise(SHAPE, SEED, sigmas, sigmas[-2], sigmas[-1]).any()  # no draw on the step to 0


# ------------------------------------------------------------------------------------ samplers vs k-diffusion
class TinyX0Net(nn.Module):
    """A random conv x0 predictor (bounded, depends on x and t): hundreds of steps per second."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.freq = nn.Parameter(torch.randn(8, generator=gen), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        h = torch.tanh(self.conv1(x) + torch.sin(t.to(x)[:, None] / 1000 * 6 * self.freq)[:, :, None, None])
        return 0.8 * torch.tanh(self.conv2(h))


@node("test.comfy_tiny")
def comfy_tiny(seed: int = 0, double: bool = False) -> {"model": T.Denoiser, "latent": T.Latent}:
    """A tiny x0-prediction denoiser on SD's training sigmas and a zero latent for it (float64 if ``double``)."""
    dtype = torch.float64 if double else torch.float32
    model = DenoiserModel(TinyX0Net(seed).to(dtype), DenoiserInfo(prediction="x0", train_schedule="sd15")).eval()
    return {"model": model, "latent": torch.zeros(SHAPE, dtype=dtype)}


@pytest.fixture(scope="module")
def engine() -> Engine:
    registry = Registry()
    nodes.register(registry)
    registry.add([comfy_tiny.__node_def__], "test")
    return Engine(registry, device="cpu")


SEQUENTIAL = {"dpm_2_ancestral", "dpmpp_2s_ancestral", "lcm"}
BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde"}
STEP_NOISE = {"euler_ancestral", "ddpm"}
# LMS's 4th-order extrapolation from linear_quadratic's crowded top sigmas (0.12 apart) over a gap of 1.7 has
# coefficients ~1e4: float32 rounding alone moves the result by ~1e-3, in any implementation. Checked in float64.
ILL_CONDITIONED = {("lms", "linear_quadratic")}
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"]


def run_graph(engine: Engine, sampler: str, scheduler: str) -> dict[str, Any]:
    link = lambda n, o: {"node": n, "output": o}  # noqa: E731
    inputs = {"model": link("tiny", "model"), "latent": link("start", "latent"), "sigmas": link("sched", "sigmas")}
    if sampler in SEQUENTIAL | BROWNIAN | STEP_NOISE:
        inputs["seed"] = SEED
    graph = {"version": 1, "nodes": {
        "tiny": {"type": "test.comfy_tiny", "inputs": {"double": (sampler, scheduler) in ILL_CONDITIONED}},
        "sched": {"type": "schedule.comfy", "inputs": {"model": link("tiny", "model"), "steps": STEPS,
                                                       "scheduler": scheduler, "sampler": sampler}},
        "noise": {"type": "latent.noise", "inputs": {"like": link("tiny", "latent"), "seed": SEED}},
        "start": {"type": "latent.add_noise", "inputs": {
            "model": link("tiny", "model"), "latent": link("tiny", "latent"), "noise": link("noise", "noise"),
            "sigmas": link("sched", "sigmas"), "start": "vp"}},  # ComfyUI's start at full denoise
        "sampler": {"type": f"sample.{sampler}", "inputs": inputs},
    }, "outputs": {"latent": link("sampler", "latent"), "model": link("tiny", "model"),
                   "sigmas": link("sched", "sigmas"), "start": link("start", "latent")}}
    return engine.run(graph).outputs


def comfy_stream(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen)


def step_noise_replay(seed: int):
    calls = iter(range(10**6))

    def draw(sigma: Any, sigma_next: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + next(calls)) % (2**63))
        return torch.randn(SHAPE, generator=gen)

    return draw


def snapped_brownian(x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    tree = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)

    def snap(s: torch.Tensor) -> torch.Tensor:
        near = sigmas[(sigmas - s).abs().argmin()]
        return near if (near - s).abs() <= 1e-5 * s else s

    return lambda sigma, sigma_next: tree(snap(sigma), snap(sigma_next))


def ref_ddpm(model, x, sigmas, noise_sampler):
    """ComfyUI's DDPM: the posterior mean and variance of Ho et al. 2020 in the VP space, eps from x0; in float64
    (in float32 its ``1 - alpha_bar`` at sigma 0.03 cancels to ~1e-4 relative)."""
    dtype, x, sigmas = x.dtype, x.double(), sigmas.double()
    for i in range(len(sigmas) - 1):
        s, s_prev = sigmas[i], sigmas[i + 1]
        eps = (x - model(x.to(dtype), s.float()).double()) / s
        abar, abar_prev = 1 / (s * s + 1), 1 / (s_prev * s_prev + 1)
        alpha = abar / abar_prev
        mean = (x / (1 + s * s).sqrt() - (1 - alpha) * eps / (1 - abar).sqrt()) / alpha.sqrt()
        if s_prev > 0:
            mean = mean + ((1 - alpha) * (1 - abar_prev) / (1 - abar)).sqrt() * noise_sampler(s, s_prev).double()
            mean = mean * (1 + s_prev * s_prev).sqrt()
        x = mean
    return x.to(dtype)


def ref_lcm(model, x, sigmas, noise_sampler):
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def phi(k: int, z: float) -> float:
    """phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z."""
    out = math.expm1(z) / z
    for j in range(1, k):
        out = (out - 1 / math.factorial(j)) / z
    return out


def ref_unipc(model, x, sigmas, bh: str = "bh1"):
    """UniPC-p with B(h) on data predictions (Zhao et al. 2023), VP space, float64, with ComfyUI's choices: a final
    sigma 0 -> 1e-3, p = min(3, n - 1), warm-up orders, lower orders at the end, no corrector on the last update."""
    s = sigmas.double().clone()
    s[-1] = s[-1] if s[-1] > 0 else 1e-3
    n, p = len(s) - 1, min(3, len(s) - 2)
    alpha, std, lam = (lambda v: 1 / (1 + v * v).sqrt()), (lambda v: v / (1 + v * v).sqrt()), (lambda v: -v.log())
    data = lambda xv, v: model((xv / alpha(v)).float(), v.float()).double()  # noqa: E731
    xv = x.double() * alpha(s[0])
    ms, ss = [data(xv, s[0])], [s[0]]
    for k in range(1, n + 1):
        q = min(k, p, n + 1 - k)
        h = float(lam(s[k]) - lam(ss[-1]))
        z = -h
        big_b = z if bh == "bh1" else math.expm1(z)
        rks = [float(lam(ss[-1 - i]) - lam(ss[-1])) / h for i in range(1, q)] + [1.0]
        ds = [(ms[-1 - i] - ms[-1]) / rks[i - 1] for i in range(1, q)]
        vander = np.array([[r ** (i - 1) for r in rks] for i in range(1, q + 1)])
        b = np.array([z * phi(i + 1, z) * math.factorial(i) / big_b for i in range(1, q + 1)])
        first = std(s[k]) / std(ss[-1]) * xv - alpha(s[k]) * math.expm1(z) * ms[-1]
        rho_p = [] if q == 1 else [0.5] if q == 2 else np.linalg.solve(vander[:-1, :-1], b[:-1])
        pred = first - alpha(s[k]) * big_b * sum((r * d for r, d in zip(rho_p, ds)), torch.zeros_like(xv))
        if k == n:
            xv = pred
            break
        m_new = data(pred, s[k])
        rho_c = [0.5] if q == 1 else np.linalg.solve(vander, b)
        corr = sum((r * d for r, d in zip(rho_c[:-1], ds)), torch.zeros_like(xv)) + rho_c[-1] * (m_new - ms[-1])
        xv = first - alpha(s[k]) * big_b * corr
        ms, ss = (ms + [m_new])[-p:], (ss + [s[k]])[-p:]
    return (xv / alpha(s[-1])).float()


def k_diffusion_run(sampler: str, model, x, sigmas) -> torch.Tensor:
    fn = lambda x_, s: model(x_, s, {})  # noqa: E731
    x = x.clone()
    if sampler in ("euler", "ddim"):
        return K.sample_euler(fn, x, sigmas, disable=True)
    if sampler in ("heun", "dpm_2", "dpmpp_2m"):
        return getattr(K, f"sample_{sampler}")(fn, x, sigmas, disable=True)
    if sampler == "lms":  # ComfyUI: the step to 0 returns the x0 prediction
        # float64 sigmas: under NumPy 2, k-diffusion's integrand of float32 sigmas is evaluated in float32, which
        # puts errors of ~1e-3 into the coefficients (~1e4) of schedules with crowded sigmas (linear_quadratic).
        fn64 = lambda x_, s: fn(x_.to(x), s.float()).double()  # noqa: E731
        out = K.sample_lms(fn64, x.double(), sigmas[:-1].double(), disable=True).to(x.dtype)
        return fn(out, sigmas[-2].expand(x.shape[0]))
    if sampler in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"):
        noise = step_noise_replay(SEED) if sampler in STEP_NOISE else comfy_stream(SEED)
        return getattr(K, f"sample_{sampler}")(fn, x, sigmas, noise_sampler=noise, disable=True)
    if sampler in BROWNIAN:
        return getattr(K, f"sample_{sampler}")(fn, x, sigmas, noise_sampler=snapped_brownian(x, sigmas, SEED),
                                               disable=True)
    if sampler == "ddpm":
        return ref_ddpm(fn, x, sigmas, step_noise_replay(SEED))
    if sampler == "lcm":
        return ref_lcm(fn, x, sigmas, comfy_stream(SEED))
    if sampler in ("uni_pc", "uni_pc_bh2"):
        return ref_unipc(fn, x, sigmas, "bh2" if sampler.endswith("bh2") else "bh1")
    raise AssertionError(sampler)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_graph_samplers_equal_k_diffusion_on_every_scheduler(engine: Engine, sampler: str) -> None:
    worst = {}
    for scheduler in SCHEDULERS:
        out = run_graph(engine, sampler, scheduler)
        with torch.inference_mode():
            expected = k_diffusion_run(sampler, out["model"], out["start"], out["sigmas"])
        assert torch.isfinite(out["latent"]).all() and not torch.equal(out["latent"], out["start"])
        worst[scheduler] = (out["latent"] - expected).abs().max().item()
    assert max(worst.values()) <= 1e-4, worst


def test_schedule_node_and_discarded_sigma(engine: Engine) -> None:
    out = run_graph(engine, "dpm_2", "karras")
    assert torch.equal(out["sigmas"], comfy.ksampler_sigmas(TRAIN, STEPS, "karras", sampler="dpm_2"))
    assert len(out["sigmas"]) == STEPS + 1


def test_noise_seed_reaches_the_stochastic_samplers(engine: Engine) -> None:
    """Same seed, same result; the step noise is what the seed draws (a replay with another seed misses)."""
    out = run_graph(engine, "dpmpp_2s_ancestral", "normal")
    fn = lambda x_, s: out["model"](x_, s, {})  # noqa: E731
    with torch.inference_mode():
        other = K.sample_dpmpp_2s_ancestral(fn, out["start"].clone(), out["sigmas"],
                                            noise_sampler=comfy_stream(SEED + 1), disable=True)
    assert (out["latent"] - other).abs().max() > 1e-2
