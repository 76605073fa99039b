"""ControlNet nodes: load a ControlNet and apply it to a denoiser.

Wiring: ``model.load_denoiser`` -> ``control.apply`` (one per ControlNet; chain them to stack) ->
``guidance.cfg`` -> sampler. The wrapper, :class:`nodes.adapters.Controlled`, implements the denoiser interface
``(x, sigma, cond) -> x0`` and must sit *inside* guidance; its docstring has the policy (inputs, schedule window,
strength, stacking, control image). ``control.apply`` refuses a model that is already guided.

The preprocessors that make control images from pictures (``control.edges``, ``control.object_mask``) are image
operations and live in :mod:`nodes.image_ops`.
"""

from __future__ import annotations

from typing import Annotated

from nodegraph import Context, Field, node
from nodegraph import types as T
from nodegraph.types import Var

from .adapters import Controlled
from .model_nodes import CONTROLNET, DType, ModelRef, load_checked, loader_hooks, model_name, model_ref

S, C, D = Var("space"), Var("channels"), Var("dim")
_M = T.Denoiser(space=S, channels=C, context_dim=D)
Fraction = Annotated[float, Field(ge=0, le=1)]



def _controlnet_types(ref: ModelRef) -> dict[str, T.PortType]:
    return {"controlnet": T.ControlNet(space=ref.config.space)}


@node("model.load_controlnet", category="model", output="controlnet", **loader_hooks(CONTROLNET, _controlnet_types))
def load_controlnet(path: model_name(CONTROLNET), dtype: DType = "float32", ctx: Context = None) -> T.ControlNet:
    """Load a U-Net or DiT ControlNet by name (``controlnet/`` of the model roots; safetensors only)."""
    return load_checked(model_ref(path, CONTROLNET, ctx), dtype)


@node("control.apply", category="control", output="model")
def apply_controlnet(model: _M, controlnet: T.ControlNet(space=S), image: T.Image, sigmas: T.Sigmas = None,
                     strength: Annotated[float, Field(ge=0, le=10, description="residual scale; 0 = off")] = 1.0,
                     start: Fraction = 0.0, end: Fraction = 1.0) -> _M:
    """Apply a ControlNet to a denoiser (before guidance); chain several to stack them."""
    return Controlled(model, controlnet, image, strength, start, end, sigmas)
