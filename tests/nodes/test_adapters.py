"""The one network-call path of :class:`nodes.adapters.DenoiserModel`: what the network is given, and the seam a
reference network class plugs into (a diffusers ``UNet2DConditionModel`` in a dozen lines, checked against
diffusers' own Euler scheduler)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from nodes.adapters import DenoiserInfo, DenoiserModel
from nodes.diffusion.parameterization import c_in, model_timestep
from nodes.diffusion.schedules import PRESETS

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class Recorder(nn.Module):
    """A network that records its keyword arguments; ``takes_pooled`` as a class attribute, like UNet and DiT."""

    takes_pooled = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.kwargs: dict[str, Any] = {}

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.kwargs = kwargs
        return x * self.weight


def conditioning(n: int = 2) -> dict[str, Tensor]:
    return {"tokens": torch.randn(n, 3, 4), "mask": torch.ones(n, 3, dtype=torch.bool), "pooled": torch.randn(n, 4)}


def test_network_inputs_are_the_scaled_sample_the_timestep_and_what_the_network_declares() -> None:
    model = DenoiserModel(Recorder(), DenoiserInfo("v", "sd15"))
    x, sigma, cond = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.5]), conditioning()
    x_in, t, kwargs = model.network_inputs(x, sigma, cond)
    torch.testing.assert_close(x_in, x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5)
    assert torch.equal(x_in, x * c_in("v", sigma).view(-1, 1, 1, 1))
    assert torch.equal(t, model_timestep("v", sigma, PRESETS["sd15"].train_sigmas()))
    assert kwargs == {"context": cond["tokens"], "context_mask": cond["mask"], "pooled": cond["pooled"]}
    _, t0, _ = model.network_inputs(x, 0.5, cond)  # one sigma for the batch: the timestep is (N,)
    assert t0.shape == (2,) and float(t0[0]) == pytest.approx(float(t[1]))
    # told at construction, or declared by the network: no pooled vector for a network that does not take one
    told = DenoiserModel(Recorder(), DenoiserInfo("v"), takes_pooled=False)
    assert "pooled" not in told.network_inputs(x, 1.0, cond)[2]
    control = {"down": [torch.zeros(1)], "mid": None}
    assert model.network_inputs(x, 1.0, {**cond, "control": control})[2]["control"] is control


def test_the_network_runs_in_its_dtype_and_answers_in_the_samples() -> None:
    net = Recorder().to(torch.float64)
    model = DenoiserModel(net, DenoiserInfo("flow", "sd3"))
    x = torch.randn(2, 4, 8, 8)
    out = model.network_output(x, 0.25, conditioning())
    assert out.dtype == torch.float32 and torch.equal(out, x)  # flow: c_in = 1
    assert net.kwargs["context"].dtype == torch.float64 and net.kwargs["context_mask"].dtype == torch.bool
    torch.testing.assert_close(model(x, 0.25, conditioning()), x - 0.25 * x)  # x0 = x - t * velocity


# --- a reference network class through the seam ----------------------------------------------------


class DiffusersUNet(DenoiserModel):
    """What an adapter for diffusers' ``UNet2DConditionModel`` needs: rename the arguments, unwrap ``.sample``."""

    def call_network(self, x_in: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        dtype, control = self.net.dtype, kwargs.get("control") or {}
        mask = kwargs.get("context_mask")
        out = self.net(x_in.to(dtype), t, encoder_hidden_states=kwargs["context"].to(dtype),
                       encoder_attention_mask=None if mask is None else mask.to(dtype),
                       down_block_additional_residuals=control.get("down"),
                       mid_block_additional_residual=control.get("mid")).sample
        return out.to(x_in.dtype)


def tiny_diffusers_unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=4, norm_num_groups=4, attention_head_dim=2).eval()


@pytest.mark.parametrize("kind,prediction", [("eps", "epsilon"), ("v", "v_prediction")])
def test_a_diffusers_unet_through_the_seam_matches_diffusers_euler(kind: str, prediction: str) -> None:
    from diffusers import EulerDiscreteScheduler

    unet = tiny_diffusers_unet()
    model = DiffusersUNet(unet, DenoiserInfo(kind, "sd15", interpolation="linear"))
    scheduler = EulerDiscreteScheduler(**SD, prediction_type=prediction)
    scheduler.set_timesteps(10)
    cond = conditioning(1)
    gen = torch.Generator().manual_seed(1)
    for i in (0, 4, 8):
        scheduler._step_index = None  # diffusers counts steps itself; each index is checked on its own
        sigma, t = scheduler.sigmas[i], scheduler.timesteps[i]
        x = torch.randn(1, 4, 8, 8, generator=gen) * (sigma**2 + 1) ** 0.5
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond["tokens"]).sample
            expected = scheduler.step(out, t, x).pred_original_sample
            got = model(x, sigma, cond)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
