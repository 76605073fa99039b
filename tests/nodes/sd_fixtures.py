"""Tiny Stable Diffusion checkpoints with the real architectures, in both real layouts.

Each family is built from diffusers' and transformers' constructors with small configs (few channels and layers,
but the families' real context widths and CLIP's real 49,408-token vocabulary, so the real tokenizer and the
family detection apply), saved as a diffusers pipeline folder (``save_pretrained``) and as one original-layout
``.safetensors`` file written through the inverse of the project's key maps. The conventions a single file
does not carry (heads, activations, VAE scale, scheduler config) are the family's, so the file loads to the
same models. SD2.x files hold one more OpenCLIP layer than the folder (the real files hold all 24; the folders
23), random here, never used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ[_k] = "1"

from nodes.checkpoints.families import scheduler_config  # noqa: E402
from nodes.checkpoints.keymaps import UNetLayout, openclip_map, unet_map, vae_map  # noqa: E402
from nodes.checkpoints.tokenizer import clip_vocab, read_merges  # noqa: E402

VAE_CHANNELS = (32, 32, 64, 64)  # four levels: the real 8x downsampling


@dataclass
class Checkpoint:
    family: str
    folder: Path  # <root>/diffusers/<name>
    file: Path  # <root>/checkpoints/<name>.safetensors
    pipe: Any  # the diffusers pipeline built from the same components (the reference)


def tokenizer_files(folder: Path, pad: str) -> None:
    merges = read_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                             "tokenizer_class": "CLIPTokenizer"}))


def clip_tokenizer(folder: Path):
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def text_model(width: int, layers: int, act: str, pad_id: int, projection: int | None = None, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=width // 64,
                                         max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=pad_id, projection_dim=projection or width)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def vae(scale: float, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS,
                                   layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                                   up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
                                   scaling_factor=scale, sample_size=64).eval()


def unet(family: str, in_channels: int = 4, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, norm_num_groups=32)
    if family == "sd1":
        net = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8,
            **common)
    elif family == "sd2":
        net = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
            attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True, **common)
    elif family == "sdxl":
        net = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048, attention_head_dim=[1, 2],
            transformer_layers_per_block=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256, **common)
    elif family == "sdxl-refiner":
        net = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=1280, attention_head_dim=[1, 2],
            transformer_layers_per_block=[1, 1], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 5 * 256, **common)
    else:
        raise ValueError(family)
    # random, not zero, output convolutions and norms everywhere: a tiny random U-Net otherwise outputs ~0
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    return net.eval()


def layout(net) -> UNetLayout:
    return UNetLayout.of(net.config)


def hf_names(state: dict) -> dict:
    """transformers' CLIP text weights under the names every SD file uses (``text_model.`` first; transformers 5's
    CLIPTextModel drops it in its own state dict)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def original(state: dict, keymap, prefix: str) -> dict[str, torch.Tensor]:
    out, unmatched = keymap.to_original(state)
    assert not unmatched, unmatched[:5]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def build(family: str, root: Path, name: str | None = None, inpaint: bool = False) -> Checkpoint:
    """A tiny checkpoint of ``family`` in ``root/diffusers/NAME`` and ``root/checkpoints/NAME.safetensors``."""
    import diffusers
    from safetensors.torch import save_file

    name = name or family + ("-inpaint" if inpaint else "")
    folder, file = root / "diffusers" / name, root / "checkpoints" / f"{name}.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    net = unet(family, 9 if inpaint else 4)
    sched_name = {"sd1": "sd1", "sd2": "sd2-v", "sdxl": "sdxl", "sdxl-refiner": "sdxl"}[family]
    scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler_config(sched_name))
    state: dict[str, torch.Tensor] = {}
    state.update(original(net.state_dict(), unet_map(layout(net)), "model.diffusion_model."))
    if family == "sdxl-refiner":  # OpenCLIP bigG alone; an img2img pipeline that takes the aesthetic score
        autoencoder = vae(0.13025)
        te2 = text_model(1280, 2, "gelu", 0, projection=64, seed=2)
        tokenizer_files(folder / "tokenizer_2", "!")
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=autoencoder, text_encoder=None, text_encoder_2=te2, tokenizer=None,
            tokenizer_2=clip_tokenizer(folder / "tokenizer_2"), unet=net, scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
        state.update(original(hf_names(te2.state_dict()), openclip_map(te2.config.num_hidden_layers, projection=True),
                              "conditioner.embedders.0.model."))
    elif family == "sdxl":
        autoencoder = vae(0.13025)
        te1 = text_model(768, 2, "quick_gelu", 49407, seed=1)
        te2 = text_model(1280, 2, "gelu", 0, projection=64, seed=2)
        tokenizer_files(folder / "tokenizer", "<|endoftext|>")
        tokenizer_files(folder / "tokenizer_2", "!")
        cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
        pipe = cls(vae=autoencoder, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(folder / "tokenizer"),
                   tokenizer_2=clip_tokenizer(folder / "tokenizer_2"), unet=net, scheduler=scheduler)
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in hf_names(te1.state_dict()).items()})
        state.update(original(hf_names(te2.state_dict()), openclip_map(te2.config.num_hidden_layers, projection=True),
                              "conditioner.embedders.1.model."))
    else:
        sd2 = family == "sd2"
        autoencoder = vae(0.18215)
        te = text_model(1024, 2, "gelu", 0, seed=1) if sd2 else text_model(768, 2, "quick_gelu", 49407, seed=1)
        tokenizer_files(folder / "tokenizer", "!" if sd2 else "<|endoftext|>")
        cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
        pipe = cls(vae=autoencoder, text_encoder=te, tokenizer=clip_tokenizer(folder / "tokenizer"), unet=net,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if sd2:
            extra = text_model(1024, 3, "gelu", 0, seed=3).state_dict()  # the real files' 24th layer
            full = hf_names({**te.state_dict(), **{k: v for k, v in extra.items() if ".layers.2." in k}})
            state.update(original(full, openclip_map(3, projection=False), "cond_stage_model.model."))
            state["cond_stage_model.model.text_projection"] = torch.randn(1024, 1024)  # in real files; unused
        else:
            state.update({f"cond_stage_model.transformer.{k}": v for k, v in hf_names(te.state_dict()).items()})
    state.update(original(autoencoder.state_dict(), vae_map(4, 1), "first_stage_model."))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(sched_name)))
    save_file(state, str(file))
    pipe.set_progress_bar_config(disable=True)
    return Checkpoint(family, folder, file, pipe)
