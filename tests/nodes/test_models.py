"""Native model architectures: shapes, checkpoint folders, dtypes, tiling, ControlNet hooks, text masks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nodes.models.config import CheckpointError, ForeignModel, load_folder, model_classes, save_folder
from nodes.models.dit import DiT, DiTConfig, MixFeedForward
from nodes.models.text import TextConfig, TextEncoder
from nodes.models.unet import UNet, UNetConfig, UNetEncoder
from nodes.models.vae import AutoencoderKL, VAEConfig

from .conftest import randomize  # noqa: E402

N, L = 2, 5  # batch, context length used with the tiny denoisers (conftest's ``one_thread`` keeps torch at 1 thread)




def text_inputs() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True] * L, [True, True, True, False, False]])
    return {"context": torch.randn(N, L, 16, generator=gen), "context_mask": mask}


def vae_case() -> tuple[nn.Module, Callable[[nn.Module, torch.dtype], Tensor]]:
    x = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    return AutoencoderKL(VAEConfig.from_name("tiny-test")), lambda m, dt: m(x.to(dt))[0]


def text_case() -> tuple[nn.Module, Callable[[nn.Module, torch.dtype], Tensor]]:
    prompts = ["a red circle", "", "ünïcødé ✓ 漢字 🙂"]

    def run(m: nn.Module, dt: torch.dtype) -> Tensor:
        tokens, pooled, _ = m.encode(prompts)
        return torch.cat([tokens.flatten(1), pooled], dim=1)

    return TextEncoder(TextConfig.from_name("tiny-test")), run


def dit_case() -> tuple[nn.Module, Callable[[nn.Module, torch.dtype], Tensor]]:
    gen = torch.Generator().manual_seed(3)
    x, pooled, cond = torch.randn(N, 4, 8, 8, generator=gen), torch.randn(N, 16, generator=gen), text_inputs()
    t = torch.tensor([10.0, 500.0])

    def run(m: nn.Module, dt: torch.dtype) -> Tensor:
        return m(x.to(dt), t, cond["context"].to(dt), cond["context_mask"], pooled=pooled.to(dt))

    return DiT(DiTConfig.from_name("tiny-test")), run


def unet_case() -> tuple[nn.Module, Callable[[nn.Module, torch.dtype], Tensor]]:
    x, cond = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(4)), text_inputs()
    t = torch.tensor([10.0, 500.0])

    def run(m: nn.Module, dt: torch.dtype) -> Tensor:
        return m(x.to(dt), t, cond["context"].to(dt), cond["context_mask"])

    return UNet(UNetConfig.from_name("tiny-test")), run


CASES = {"vae": vae_case, "text": text_case, "dit": dit_case, "unet": unet_case}
EXPECTED_SHAPES = {"vae": (N, 3, 16, 16), "text": (3, 16 * 16 + 16), "dit": (N, 4, 8, 8), "unet": (N, 4, 8, 8)}


# --- configs and shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CASES)
def test_forward_shape_and_finite(kind: str) -> None:
    model, run = CASES[kind]()
    with torch.no_grad():
        out = run(randomize(model), torch.float32)
    assert out.shape == EXPECTED_SHAPES[kind]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("config_cls", [VAEConfig, TextConfig, DiTConfig, UNetConfig])
def test_presets_round_trip_and_unknown_name(config_cls: type) -> None:
    module = __import__(config_cls.__module__, fromlist=["PRESETS"])
    assert {"tiny-test", "shapes"} <= set(module.PRESETS)
    for name, config in module.PRESETS.items():
        assert config_cls.from_name(name) is config
        data = json.loads(json.dumps(config.to_dict()))
        assert data["model_type"] == config_cls.model_type
        assert config_cls.from_dict(data) == config
        assert model_classes(config_cls.model_type)[0] is config_cls
    with pytest.raises(ValueError, match="valid names: .*shapes.*tiny-test"):
        config_cls.from_name("nope")
    with pytest.raises(ValueError, match="no field.*bogus"):
        config_cls.from_dict({"bogus": 1})
    field = next(f.name for f in dataclasses.fields(config_cls) if type(getattr(config_cls(), f.name)) is int)
    with pytest.raises(ValueError, match=f"wrong type: {field} \\(int\\)"):
        config_cls.from_dict({field: True})  # strict: a bool is not an int, nor "3", nor 3.0


def test_config_validation_is_clear() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))


# --- checkpoint folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CASES)
def test_save_load_round_trip_identical(kind: str, tmp_path: Path) -> None:
    model, run = CASES[kind]()
    randomize(model)
    save_folder(model, tmp_path / kind)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert config["model_type"] == kind
    loaded = load_folder(tmp_path / kind)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(run(model, torch.float32), run(loaded, torch.float32))


def test_load_refuses_pickle_weights(tmp_path: Path) -> None:
    model = randomize(TextEncoder(TextConfig.from_name("tiny-test")))
    save_folder(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*only safetensors"):
        load_folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt"):
        (tmp_path / "model.ckpt").write_bytes(b"not read")
        load_folder(tmp_path / "model.ckpt")
    # A pickle renamed to model.safetensors is caught by the safetensors reader, not unpickled.
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_folder(tmp_path)


def test_load_reports_missing_unexpected_and_shape(tmp_path: Path) -> None:
    model = randomize(DiT(DiTConfig.from_name("tiny-test")))
    save_folder(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = state.pop("final_layer.linear.bias")
    save_file(state, str(weights))
    expected = r"missing keys \[final_layer\.linear\.bias\]; unexpected keys \[extra\.weight\]"
    with pytest.raises(CheckpointError, match=expected):
        load_folder(tmp_path)
    state["<script>\x1b[2J"] = state.pop("extra.weight")  # a foreign file's odd names are counted, not quoted
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[\] and 1 odd name") as err:
        load_folder(tmp_path)
    assert "script" not in str(err.value) and "\x1b" not in str(err.value)
    state["final_layer.linear.bias"] = torch.zeros(7)
    del state["<script>\x1b[2J"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.bias: expected \(16,\), file has \(7,\)"):
        load_folder(tmp_path)


def test_load_dtype_names_and_bad_config(tmp_path: Path) -> None:
    save_folder(AutoencoderKL(VAEConfig.from_name("tiny-test")), tmp_path)
    assert {p.dtype for p in load_folder(tmp_path, dtype="bfloat16").parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="floating torch.dtype"):
        load_folder(tmp_path, dtype=torch.int8)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sampler"}))
    with pytest.raises(ForeignModel, match="holds a model of another kind") as err:
        load_folder(tmp_path)
    assert "sampler" not in str(err.value)  # a foreign file's values are never quoted
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vae", "latent_channels": "4"}))
    with pytest.raises(CheckpointError, match=r"wrong type: latent_channels \(int\)"):
        load_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vae", "mystery": 1}))
    with pytest.raises(CheckpointError, match="1 field.* a VAEConfig does not have") as err:
        load_folder(tmp_path)
    assert "mystery" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_folder(tmp_path / "missing")


# --- dtypes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("kind", CASES)
def test_low_precision_close_to_float32(kind: str, dtype: torch.dtype, tol: float, tmp_path: Path) -> None:
    model, run = CASES[kind]()
    save_folder(randomize(model), tmp_path)
    low = load_folder(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in low.parameters())
    with torch.no_grad():
        ref, out = run(model, torch.float32), run(low, dtype)
    assert out.dtype == dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=tol * scale, rtol=tol)


# --- VAE --------------------------------------------------------------------------------------------


def test_vae_tiled_decode_matches_plain_decode() -> None:
    vae = randomize(AutoencoderKL(VAEConfig.from_name("tiny-test")))
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = vae.decode(z)
        torch.testing.assert_close(vae.tiled_decode(z, tile=12, overlap=4), plain)
        tiled = vae.tiled_decode(z, tile=6, overlap=3)
    assert tiled.shape == plain.shape == (1, 3, 24, 20)
    assert (tiled - plain).abs().mean() < 0.25 * plain.abs().mean()  # differs only near tile seams


def test_vae_tiled_blending_is_exact_for_a_local_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = AutoencoderKL(VAEConfig.from_name("tiny-test"))
    monkeypatch.setattr(vae, "decode", lambda z: z[:, :3].repeat_interleave(2, -2).repeat_interleave(2, -1))
    z = torch.randn(2, 4, 11, 9)
    for tile, overlap in [(4, 0), (4, 1), (5, 3), (3, 2)]:
        torch.testing.assert_close(vae.tiled_decode(z, tile, overlap), vae.decode(z))
    with pytest.raises(ValueError, match="overlap < tile"):
        vae.tiled_decode(z, tile=4, overlap=4)


def test_vae_latent_scaling_round_trip_and_sampling() -> None:
    vae = AutoencoderKL(VAEConfig.from_name("flux").replace(base_channels=8, norm_groups=4, num_res_blocks=1))
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(vae.unscale_latent(vae.scale_latent(z)), z)
    mean, logvar = torch.zeros(1, 16, 4, 4), torch.full((1, 16, 4, 4), math.log(4.0))
    torch.testing.assert_close(vae.sample(mean, logvar, torch.ones_like(mean)), torch.full_like(mean, 2.0))
    with pytest.raises(ValueError, match="not divisible by the VAE factor 8"):
        vae.encode(torch.zeros(1, 3, 12, 16))


# --- U-Net ------------------------------------------------------------------------------------------


def unet_inputs() -> tuple[UNet, tuple[Tensor, ...], list[Tensor], Tensor]:
    unet = randomize(UNet(UNetConfig.from_name("tiny-test")))
    x, cond = torch.randn(N, 4, 8, 8), text_inputs()
    args = (x, torch.tensor(3.0), cond["context"], cond["context_mask"])
    with torch.no_grad():
        skips, mid, _ = unet.encoder(*args)
    return unet, args, skips, mid


def test_unet_control_residuals() -> None:
    unet, args, skips, mid = unet_inputs()
    assert len(skips) == len(unet.encoder.skip_channels) and [s.shape[1] for s in skips] == unet.encoder.skip_channels
    with torch.no_grad():
        plain = unet(*args)
        zero = unet(*args, control={"down": [torch.zeros_like(s) for s in skips], "mid": torch.zeros_like(mid)})
        some = unet(*args, control={"down": [torch.randn_like(s) for s in skips]})
        mid_only = unet(*args, control={"mid": torch.randn_like(mid)})
    assert torch.equal(zero, plain)
    assert not torch.allclose(some, plain) and not torch.allclose(mid_only, plain)


def test_unet_control_shape_errors_name_the_residual() -> None:
    unet, args, skips, mid = unet_inputs()
    down = [torch.zeros_like(s) for s in skips]
    down[2] = torch.zeros(N, skips[2].shape[1] + 1, *skips[2].shape[2:])
    with pytest.raises(ValueError, match=r"control\['down'\]\[2\] has shape .* expected \(2, 8, 4, 4\)"):
        unet(*args, control={"down": down})
    with pytest.raises(ValueError, match=r"control\['mid'\] has shape \(2, 16, 8, 8\), expected \(2, 16, 4, 4\)"):
        unet(*args, control={"mid": torch.zeros(N, 16, 8, 8)})
    with pytest.raises(ValueError, match=r"list of 4 residuals .* got 3"):
        unet(*args, control={"down": down[:3]})
    with pytest.raises(ValueError, match="unknown key"):
        unet(*args, control={"up": []})


def test_unet_encoder_copies_into_a_controlnet_trunk() -> None:
    unet, args, skips, mid = unet_inputs()
    trunk = UNetEncoder(unet.config)
    trunk.load_state_dict(unet.encoder.state_dict())
    with torch.no_grad():
        copy_skips, copy_mid, _ = trunk(*args)
        hinted, _, _ = trunk(*args, hint=torch.ones_like(skips[0]))
    assert all(torch.equal(a, b) for a, b in zip(copy_skips, skips)) and torch.equal(copy_mid, mid)
    assert torch.equal(hinted[0], skips[0] + 1)


def test_denoisers_ignore_masked_context_tokens() -> None:
    cond = text_inputs()
    changed = cond["context"].clone()
    changed[1, 3:] += 5.0  # masked-out tokens of sample 1
    x = torch.randn(N, 4, 8, 8)
    unet = randomize(UNet(UNetConfig.from_name("tiny-test")))
    dit = randomize(DiT(DiTConfig.from_name("tiny-test")))
    with torch.no_grad():
        for model in (unet, dit):
            a = model(x, torch.tensor(5.0), cond["context"], cond["context_mask"])
            b = model(x, torch.tensor(5.0), changed, cond["context_mask"])
            torch.testing.assert_close(a, b)


# --- DiT --------------------------------------------------------------------------------------------


def test_dit_control_residuals_and_errors() -> None:
    dit = randomize(DiT(DiTConfig.from_name("tiny-test")))
    cond = text_inputs()
    x, t = torch.randn(N, 4, 8, 12), torch.tensor([1.0, 2.0])
    tokens = (N, (8 // 2) * (12 // 2), 32)
    with torch.no_grad():
        plain = dit(x, t, cond["context"], cond["context_mask"])
        zero = dit(x, t, cond["context"], cond["context_mask"], control=[torch.zeros(tokens)] * 2)
        some = dit(x, t, cond["context"], cond["context_mask"], control=[None, torch.randn(tokens)])
        with_pooled = dit(x, t, cond["context"], cond["context_mask"], pooled=torch.randn(N, 16))
    assert plain.shape == x.shape
    assert torch.equal(zero, plain)
    assert not torch.allclose(some, plain) and not torch.allclose(with_pooled, plain)
    with pytest.raises(ValueError, match=r"control\[1\] has shape \(2, 24, 16\), expected \(2, 24, 32\)"):
        dit(x, t, cond["context"], control=[None, torch.zeros(N, 24, 16)])
    with pytest.raises(ValueError, match="3 residuals, expected one per block \\(2\\)"):
        dit(x, t, cond["context"], control=[None] * 3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        dit(torch.randn(1, 4, 7, 8), t[:1], cond["context"][:1])


def test_dit_long_skips_start_as_identity_then_mix_mirrored_blocks(tmp_path: Path) -> None:
    config = DiTConfig.from_name("tiny-test").replace(depth=4)
    plain = randomize(DiT(config))
    skipped = DiT(config.replace(long_skip=True))
    skipped.load_state_dict(plain.state_dict(), strict=False)  # everything but the fresh [I | 0] skips
    assert len(skipped.skip_linears) == 2
    cond = text_inputs()
    x, t = torch.randn(N, 4, 8, 8), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(skipped(x, t, cond["context"]), plain(x, t, cond["context"]))
        # Block 3 (the last) takes block 0's output, block 2 takes block 1's: perturb the last skip's
        # skip-half and only a change in block 0's output (or earlier) may reach it.
        skipped.skip_linears[1].weight[:, 32:].normal_(std=0.1)
        mixed = skipped(x, t, cond["context"])
    assert not torch.allclose(mixed, plain(x, t, cond["context"]))
    # The wiring, spelled out: control is added after a block, then its output is kept for the mirror block.
    control = [torch.randn(N, 16, 32), torch.randn(N, 16, 32), None, None]
    with torch.no_grad():
        h, c = skipped.patchify(x), skipped.condition(t, None, N)
        h0 = skipped.blocks[0](h, c, cond["context"], None) + control[0]
        h1 = skipped.blocks[1](h0, c, cond["context"], None) + control[1]
        h2 = skipped.blocks[2](skipped.skip_linears[0](torch.cat([h1, h1], -1)), c, cond["context"], None)
        h3 = skipped.blocks[3](skipped.skip_linears[1](torch.cat([h2, h0], -1)), c, cond["context"], None)
        expected = skipped.unpatchify(skipped.final_layer(h3, c), 8, 8)
        torch.testing.assert_close(skipped(x, t, cond["context"], control=control), expected)
    save_folder(skipped, tmp_path / "dit")
    loaded = load_folder(tmp_path / "dit")
    assert loaded.config.long_skip
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond["context"]), mixed)


def test_mix_ffn_convolves_each_token_with_its_grid_neighbours() -> None:
    """Tokens are row-major over a (rows, columns) grid: a kernel that reads the left neighbour shifts every row
    right by one token (a transposed or wrongly strided grid would shift columns or wrap rows)."""
    ffn = MixFeedForward(1, 1)
    with torch.no_grad():
        ffn.fc1.weight.fill_(1.0), ffn.fc1.bias.zero_()
        ffn.dwconv.weight.zero_(), ffn.dwconv.bias.zero_()
        ffn.dwconv.weight[0, 0, 1, 0] = 1.0  # output (r, c) += input (r, c - 1)
        ffn.fc2.weight.fill_(1.0), ffn.fc2.bias.zero_()
        grid = torch.arange(1.0, 7.0).reshape(2, 3)  # 2 rows, 3 columns
        out = ffn(grid.reshape(1, 6, 1), (2, 3)).reshape(2, 3)
    shifted = grid + nn.functional.pad(grid[:, :-1], (1, 0))  # each token plus its left neighbour (0 at the edge)
    torch.testing.assert_close(out, nn.functional.gelu(shifted, approximate="tanh"))


def test_dit_mix_ffn_starts_as_the_plain_mlp_and_round_trips(tmp_path: Path) -> None:
    config = DiTConfig.from_name("tiny-test")
    plain = randomize(DiT(config))
    mixed = DiT(config.replace(mix_ffn=True))
    missing = mixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.mlp.dwconv.{w}" for i in range(2) for w in ("bias", "weight")]
    cond = text_inputs()
    x, t = torch.randn(N, 4, 8, 12), torch.tensor([1.0, 2.0])  # a 4 x 6 token grid
    with torch.no_grad():
        torch.testing.assert_close(mixed(x, t, cond["context"]), plain(x, t, cond["context"]))
        mixed.blocks[1].mlp.dwconv.weight.normal_(std=0.1)
        out = mixed(x, t, cond["context"])
    assert out.shape == x.shape and not torch.allclose(out, plain(x, t, cond["context"]))
    with pytest.raises(ValueError, match="token grid"):
        mixed.blocks[0](mixed.patchify(x), mixed.condition(t, None, N), cond["context"], None)
    save_folder(mixed, tmp_path / "dit")
    loaded = load_folder(tmp_path / "dit")
    assert loaded.config.mix_ffn
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond["context"]), out)


def test_dit_pooled_tokens_join_the_cross_attention_context(tmp_path: Path) -> None:
    """``pooled_tokens`` maps the pooled vector to extra context tokens that every cross-attention sees, kept by
    the mask; the byte tokens' padding stays masked."""
    config = DiTConfig.from_name("tiny-test").replace(pooled_tokens=3)
    dit = randomize(DiT(config))
    cond = text_inputs()
    pooled = torch.randn(N, 16)
    mask = torch.ones(N, cond["context"].shape[1], dtype=torch.bool)
    mask[1, 2:] = False
    context, keep = dit.text_context(cond["context"], mask, pooled)
    assert context.shape == (N, cond["context"].shape[1] + 3, 16)
    torch.testing.assert_close(context[:, -3:], dit.pooled_to_tokens(pooled).reshape(N, 3, 16))
    assert torch.equal(keep[:, -3:], torch.ones(N, 3, dtype=torch.bool)) and torch.equal(keep[:, :-3], mask)
    x, t = torch.randn(N, 4, 8, 8), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        out = dit(x, t, cond["context"], mask, pooled=pooled)
        # The same forward with the tokens spelled out through the blocks.
        h, c = dit.patchify(x), dit.condition(t, pooled, N)
        for block in dit.blocks:
            h = block(h, c, context, keep, dit.grid(8, 8))
        torch.testing.assert_close(out, dit.unpatchify(dit.final_layer(h, c), 8, 8))
        dit.pooled_to_tokens.weight.mul_(2.0)  # the tokens, not only the AdaLN path, reach the output
        assert not torch.allclose(dit(x, t, cond["context"], mask, pooled=pooled), out)
        dit.pooled_to_tokens.weight.div_(2.0)
    with pytest.raises(ValueError, match="maps the pooled text vector to 3 context tokens"):
        dit(x, t, cond["context"])
    with pytest.raises(ValueError, match="needs a pooled text vector"):
        DiTConfig.from_name("tiny-test").replace(pooled_dim=0, pooled_tokens=2)
    with pytest.raises(ValueError, match="nothing to attend"):
        DiTConfig.from_name("tiny-test").replace(text_tokens=False)
    # Without the byte tokens the cross-attention sees only the pooled tokens: the byte tokens cannot matter.
    only = randomize(DiT(config.replace(text_tokens=False)))
    context, keep = only.text_context(cond["context"], mask, pooled)
    torch.testing.assert_close(context, only.pooled_to_tokens(pooled).reshape(N, 3, 16))
    assert keep.shape == (N, 3) and bool(keep.all())
    with torch.no_grad():
        torch.testing.assert_close(only(x, t, torch.randn_like(cond["context"]), pooled=pooled),
                                   only(x, t, cond["context"], mask, pooled=pooled))
    save_folder(dit, tmp_path / "dit")
    loaded = load_folder(tmp_path / "dit")
    assert loaded.config.pooled_tokens == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond["context"], mask, pooled=pooled), out)


# --- text encoder -----------------------------------------------------------------------------------


def test_tokenizer_bytes_specials_truncation() -> None:
    encoder = TextEncoder(TextConfig.from_name("tiny-test"))
    tok = encoder.tokenizer
    ids, mask = tok(["", "é", "x" * 100])
    assert ids.shape == (3, 16) and mask.dtype == torch.bool
    assert ids[0, :2].tolist() == [1, 2] and mask[0].sum() == 2
    assert ids[1, :4].tolist() == [1, 0xC3 + 3, 0xA9 + 3, 2] and tok.decode(ids[1].tolist()) == "é"
    assert mask[2].all() and ids[2, -1] == 2  # truncated to max_length, EOS kept
    assert tok(["ab"], pad_to_max_length=True)[0].shape == (1, 16)
    with pytest.raises(TypeError):
        tok("not a list")


def test_text_encoder_handles_any_string_and_padding_does_not_leak() -> None:
    encoder = randomize(TextEncoder(TextConfig.from_name("tiny-test")))
    with torch.no_grad():
        tokens, pooled, mask = encoder.encode(["", "漢字 🙂 ünïcødé", "blue square"])
        alone_tokens, alone_pooled, _ = encoder.encode(["blue square"])
        padded = encoder.encode(["blue square"], pad_to_max_length=True)[1]
    assert tokens.shape == (3, 16, 16) and pooled.shape == (3, 16) and mask.shape == (3, 16)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    assert (tokens[~mask] == 0).all()
    torch.testing.assert_close(pooled[2], alone_pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], alone_pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[2, : alone_tokens.shape[1]], alone_tokens[0], atol=1e-5, rtol=1e-5)


def test_unet_position_embedding_adds_no_parameters_and_breaks_translation_symmetry() -> None:
    base = UNetConfig.from_name("tiny-test")
    plain, placed = UNet(base), UNet(base.replace(position_embedding=True))
    assert plain.state_dict().keys() == placed.state_dict().keys()
    randomize(plain)
    placed.load_state_dict(plain.state_dict())
    cond = text_inputs()
    # same weights, same input: the outputs differ only through the position embedding
    x = torch.ones(N, 4, 16, 16)
    with torch.no_grad():
        a, b = (net(x, torch.tensor(3.0), cond["context"], cond["context_mask"]) for net in (plain, placed))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="divisible by 4"):
        UNetConfig(model_channels=6, channel_mult=(1,), attention_levels=(0,), num_heads=2, norm_groups=2,
                   position_embedding=True)
