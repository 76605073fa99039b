"""Bad input to the diffusion pack: each is a clear error naming the node (and port), never a crash, and
nothing is written anywhere.

* a latent of one space wired to a VAE of another, a text encoder of the wrong width: validation
  ``type_mismatch`` from ``config.json`` alone (the weights are corrupted or missing and never read);
* a wrong-channel ControlNet residual: a ValueError naming the residual, surfaced as NodeExecutionError;
* a pickle-based weight file instead of ``model.safetensors``: refused by name, never opened;
* ``image.save`` / ``image.load`` paths escaping the output / input root;
* an unknown model name: validation ``unknown_model`` whose hint lists the shipped models (names in model roots,
  paths, foreign configs: ``tests/nodes/test_model_roots.py``).

The fixtures' models are tmp folders named by absolute path, which the engines here allow explicitly
(``ModelRoots(allow_paths=True)``, the embedding API).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

import nodes.model_nodes
import nodes.models.config
from nodegraph import Engine, GraphValidationError, NodeExecutionError, default_registry, node
from nodegraph import types as T
from nodegraph.roots import ModelRoots
from nodes.adapters import DenoiserInfo, DenoiserModel
from nodes.models.config import PICKLE_SUFFIXES, WEIGHTS_NAME, load_folder
from tests.nodes.conftest import SIZE, TinyModels, gradient_image, link, txt2img_graph


def files_under(root: Path) -> set[str]:
    """Every file and folder below root (to prove that a failed run wrote nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def codes(issues) -> list[tuple[str, str | None, str | None]]:
    return [(i.code, i.node, i.port) for i in issues]


def with_save(graph: dict[str, Any], source: dict[str, str], path: str = "result.png") -> dict[str, Any]:
    """Add an ``image.save`` of ``source`` so that a run that got that far would write a file."""
    graph["nodes"]["save"] = {"type": "image.save", "inputs": {"image": source, "path": path}}
    graph["outputs"] = {"file": link("save", "file")}
    return graph


@pytest.fixture
def weights_never_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail (and record) any attempt to load a checkpoint's tensors."""
    calls: list[str] = []

    def refuse(name: str):
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{name}{args[:1]}")
            raise AssertionError(f"{name} called: weights were read during validation")
        return fn

    monkeypatch.setattr(nodes.model_nodes, "load_folder", refuse("load_folder"))
    monkeypatch.setattr(nodes.models.config, "load_file", refuse("safetensors.load_file"))
    monkeypatch.setattr(nodes.models.config, "safe_open", refuse("safetensors.safe_open"))
    return calls


def damaged_copy(src: str, dst: Path, how: Literal["corrupt", "remove"]) -> str:
    """A copy of a checkpoint folder whose weights are unusable; config.json (and denoiser.json) intact."""
    shutil.copytree(src, dst)
    if how == "corrupt":
        (dst / WEIGHTS_NAME).write_bytes(b"\x00not a safetensors file\xff" * 8)
    else:
        (dst / WEIGHTS_NAME).unlink()
    return str(dst)


# ---------------------------------------------------------------------------------------------------------
# mismatched latent space / conditioning width: validation only, from config.json
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["corrupt", "remove"])
def test_vae_of_another_latent_space_is_a_type_mismatch_before_any_weight_loads(
        engine, tiny_models, tmp_path, weights_never_read, how) -> None:
    vae = damaged_copy(tiny_models.vae, tmp_path / "vae", how)
    other = damaged_copy(tiny_models.vae_other, tmp_path / "vae_other", how)
    graph = {"version": 1, "nodes": {
        "vae": {"type": "model.load_vae", "inputs": {"path": vae}},
        "other": {"type": "model.load_vae", "inputs": {"path": other}},
        "empty": {"type": "latent.empty", "inputs": {"vae": link("vae"), "width": SIZE, "height": SIZE}},
        "decode": {"type": "vae.decode", "inputs": {"vae": link("other", "vae"), "latent": link("empty")}},
    }, "outputs": {}}
    graph = with_save(graph, link("decode"))
    before = files_under(tmp_path)
    issues = engine.validate(graph).issues
    assert codes(issues) == [("type_mismatch", "decode", "latent")], issues
    assert "'tiny-test'" in issues[0].message and "'other-space'" in issues[0].message
    with pytest.raises(GraphValidationError) as err:
        engine.run(graph)
    assert "decode.latent" in str(err.value) and "space" in str(err.value)
    assert weights_never_read == []
    assert files_under(tmp_path) == before


def test_latent_of_another_space_into_the_denoiser_is_a_type_mismatch(engine, tiny_models, tmp_path,
                                                                     weights_never_read) -> None:
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["vae"]["inputs"]["path"] = damaged_copy(tiny_models.vae_other, tmp_path / "other", "corrupt")
    graph["nodes"]["unet"]["inputs"]["path"] = damaged_copy(tiny_models.unet, tmp_path / "unet", "remove")
    graph = with_save(graph, link("decode"))
    issues = engine.validate(graph).issues
    assert ("type_mismatch", "start", "latent") in codes(issues), issues
    assert_refused_before_loading(engine, graph, weights_never_read, tmp_path)


def test_decoding_a_sampled_latent_with_a_vae_of_another_space_is_a_type_mismatch(engine, tiny_models, tmp_path,
                                                                                 weights_never_read) -> None:
    """The latent leaving ``sample.*`` still lives in the denoiser's space (tiny-test): decoding it with a VAE
    of another space must be caught by validation, as it is for a latent that did not pass through a sampler."""
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["other"] = {"type": "model.load_vae", "inputs": {
        "path": damaged_copy(tiny_models.vae_other, tmp_path / "other", "corrupt")}}
    graph["nodes"]["decode"]["inputs"]["vae"] = link("other", "vae")
    graph = with_save(graph, link("decode"))
    issues = engine.validate(graph).issues
    assert ("type_mismatch", "decode", "latent") in codes(issues), (
        f"a tiny-test latent from sample.euler decoded by an other-space VAE passed validation; issues: {issues}")
    assert weights_never_read == []


def test_text_encoder_of_the_wrong_width_is_a_type_mismatch_at_guidance(engine, tiny_models, tmp_path,
                                                                        weights_never_read) -> None:
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["text"]["inputs"]["path"] = damaged_copy(tiny_models.text_wide, tmp_path / "wide", "corrupt")
    graph["nodes"]["unet"]["inputs"]["path"] = damaged_copy(tiny_models.unet, tmp_path / "unet", "corrupt")
    graph = with_save(graph, link("decode"))
    issues = engine.validate(graph).issues
    mismatches = [i for i in issues if i.code == "type_mismatch"]
    assert ("type_mismatch", "guided", "negative") in codes(mismatches), issues
    assert all("32" in i.message and "16" in i.message for i in mismatches)
    assert_refused_before_loading(engine, graph, weights_never_read, tmp_path)


def test_text_encoder_of_the_wrong_width_is_a_type_mismatch_without_guidance(engine, tiny_models, tmp_path,
                                                                            weights_never_read) -> None:
    """No guidance node: the only place width meets context_dim is the sampler's cond -> denoise edge."""
    graph = txt2img_graph(tiny_models, guidance=False)
    graph["nodes"]["text"]["inputs"]["path"] = damaged_copy(tiny_models.text_wide, tmp_path / "wide", "corrupt")
    graph = with_save(graph, link("decode"))
    issues = engine.validate(graph).issues
    assert "type_mismatch" in [i.code for i in issues], (
        f"a width-32 text encoder feeding a context_dim-16 U-Net through sample.euler passed validation; "
        f"issues: {issues}")
    assert any(i.node and i.node.startswith("sampler") for i in issues if i.code == "type_mismatch")
    assert weights_never_read == []


def test_text_encoder_of_the_right_width_validates(engine, tiny_models, weights_never_read) -> None:
    """The control case of the two tests above: same graphs, matching widths, no issue and nothing loaded."""
    assert engine.validate(txt2img_graph(tiny_models)).issues == []
    assert engine.validate(txt2img_graph(tiny_models, guidance=False)).issues == []
    assert weights_never_read == []


# ---------------------------------------------------------------------------------------------------------
# ControlNet residual of the wrong channel count
# ---------------------------------------------------------------------------------------------------------

# Skips of the tiny-test U-Net on a 16x16 latent: conv_in, res block (level 0), downsample, res block (level 1).
SKIPS = [(8, 16), (8, 16), (8, 8), (16, 8)]
MID = (16, 8)


@node("test.add_control", category="test", output="cond")
def add_control(cond: T.Conditioning, wrong: Literal["none", "mid", "down"] = "none") -> T.Conditioning:
    """Attach zero ControlNet residuals to a conditioning; ``wrong`` gives one of them a wrong channel count."""
    down = [torch.zeros(1, c, s, s) for c, s in SKIPS]
    mid = torch.zeros(1, MID[0] + (4 if wrong == "mid" else 0), MID[1], MID[1])
    if wrong == "down":
        down[3] = torch.zeros(1, 8, 8, 8)
    return {**cond, "control": {"down": down, "mid": mid}}


@pytest.fixture
def control_engine(tmp_path: Path) -> Engine:
    registry = default_registry().copy()
    registry.add(add_control.__node_def__, "test")
    return Engine(registry, device="cpu", input_root=tmp_path / "in", output_root=tmp_path / "out",
                  model_roots=ModelRoots(allow_paths=True))


def control_graph(models: TinyModels, wrong: str) -> dict[str, Any]:
    graph = txt2img_graph(models, "euler", guidance=False)
    graph["nodes"]["ctrl"] = {"type": "test.add_control", "inputs": {"cond": link("pos"), "wrong": wrong}}
    graph["nodes"]["sampler"]["inputs"]["cond"] = link("ctrl", "cond")
    return with_save(graph, link("decode"))


@pytest.mark.parametrize("wrong, message", [
    ("mid", r"control\['mid'\] has shape \(1, 20, 8, 8\), expected \(1, 16, 8, 8\)"),
    ("down", r"control\['down'\]\[3\] has shape \(1, 8, 8, 8\), expected \(1, 16, 8, 8\)"),
])
def test_wrong_channel_control_residual_is_a_node_error_naming_the_residual(control_engine, tiny_models, tmp_path,
                                                                            wrong, message) -> None:
    before = files_under(tmp_path)
    with pytest.raises(NodeExecutionError) as err:
        control_engine.run(control_graph(tiny_models, wrong))
    exc = err.value
    assert exc.node.startswith("sampler/") and exc.node.endswith("denoise") and exc.node_type == "denoise"
    assert isinstance(exc.error, ValueError)
    assert exc.to_json()["exception"] == "ValueError"
    assert re.search(message, str(exc.error)), str(exc.error)
    assert files_under(tmp_path) == before


def test_right_channel_control_residuals_run(control_engine, tiny_models, tmp_path) -> None:
    """Control case: zero residuals of the right shapes run and change nothing."""
    with_control = control_engine.run(control_graph(tiny_models, "none"), outputs=["file"]).outputs["file"]
    assert Path(with_control).is_file()
    plain = control_engine.run(txt2img_graph(tiny_models, "euler", guidance=False), outputs=["latent"])
    graph = control_graph(tiny_models, "none")
    graph["outputs"] = {"latent": link("sampler", "latent")}
    controlled = control_engine.run(graph).outputs["latent"]
    assert torch.equal(controlled, plain.outputs["latent"])


def test_wrong_channel_control_residual_called_directly(tiny_models) -> None:
    model = DenoiserModel(load_folder(tiny_models.unet), DenoiserInfo.read(tiny_models.unet))
    x = torch.zeros(1, 4, 16, 16)
    cond = {"tokens": torch.zeros(1, 3, 16), "control": {"mid": torch.zeros(1, 3, 8, 8)}}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"control\['mid'\] has shape \(1, 3, 8, 8\)"):
        model(x, 1.0, cond)


# ---------------------------------------------------------------------------------------------------------
# pickle-based weight files
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker folder: proof that the file was deserialised."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def pickles_never_opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and fail) any open of a pickle-suffixed file and any torch.load / pickle.load(s)."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def is_pickle(file: Any) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and Path(os.fsdecode(file)).suffix.lower() in PICKLE_SUFFIXES

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if is_pickle(file):
            opened.append(os.fsdecode(file))
            raise AssertionError(f"opened {file}")
        return real_open(file, *args, **kwargs)

    def guarded_os_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if is_pickle(file):
            opened.append(os.fsdecode(file))
            raise AssertionError(f"opened {file}")
        return real_os_open(file, *args, **kwargs)

    def no_unpickle(name: str):
        def fn(*args: Any, **kwargs: Any) -> Any:
            opened.append(name)
            raise AssertionError(f"{name} called")
        return fn

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(torch, "load", no_unpickle("torch.load"))
    monkeypatch.setattr(pickle, "load", no_unpickle("pickle.load"))
    monkeypatch.setattr(pickle, "loads", no_unpickle("pickle.loads"))
    return opened


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.ckpt"])
def test_pickle_weight_file_is_refused_by_name_and_never_opened(engine, tiny_models, tmp_path, name,
                                                                pickles_never_opened) -> None:
    folder = tmp_path / "unet_pickled"
    shutil.copytree(tiny_models.unet, folder)
    (folder / WEIGHTS_NAME).unlink()
    marker = tmp_path / "UNPICKLED"
    with real_open_for_setup(folder / name, "wb") as f:
        pickle.dump(_Payload(marker), f)
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["unet"]["inputs"]["path"] = str(folder)
    graph = with_save(graph, link("decode"))
    assert engine.validate(graph).issues == []  # validation reads config.json / denoiser.json only
    before = files_under(tmp_path)
    with pytest.raises(NodeExecutionError) as err:
        engine.run(graph)
    exc = err.value
    assert (exc.node, exc.node_type) == ("unet", "model.load_denoiser")
    assert name in str(exc.error) and "safetensors" in str(exc.error)
    assert getattr(exc.error, "code", None) == "bad_checkpoint"
    assert pickles_never_opened == []
    assert not marker.exists()
    assert files_under(tmp_path) == before


def real_open_for_setup(path: Path, mode: str):
    """Write test fixtures with the real open, even while ``pickles_never_opened`` guards builtins.open."""
    return io.FileIO(path, mode.replace("b", ""))


def test_pickle_file_passed_as_the_model_path_is_refused_without_opening(engine, tiny_models, tmp_path,
                                                                         pickles_never_opened) -> None:
    ckpt = tmp_path / "model.ckpt"
    with real_open_for_setup(ckpt, "wb") as f:
        f.write(b"\x80\x04not read")
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["unet"]["inputs"]["path"] = str(ckpt)
    issues = engine.validate(graph).issues
    assert ("unknown_model", "unet", "path") in codes(issues), issues
    assert pickles_never_opened == []


# ---------------------------------------------------------------------------------------------------------
# file paths outside the input / output roots
# ---------------------------------------------------------------------------------------------------------


def escaping_paths(tmp_path: Path, name: str) -> list[str]:
    return [f"../{name}", f"sub/../../{name}", f"../../{name}", str(tmp_path / "elsewhere" / name)]


@pytest.mark.parametrize("which", range(4))
def test_image_save_outside_the_output_root_is_refused(engine, tmp_path, which) -> None:
    path = escaping_paths(tmp_path, "escape.png")[which]
    graph = with_save({"version": 1, "nodes": {"grad": gradient_image()}, "outputs": {}}, link("grad", "image"), path)
    before = files_under(tmp_path.parent)
    with pytest.raises(NodeExecutionError) as err:
        engine.run(graph)
    exc = err.value
    assert (exc.node, exc.node_type) == ("save", "image.save")
    assert isinstance(exc.error, PermissionError)
    assert "outside the output root" in str(exc.error) and repr(path) in str(exc.error)
    assert files_under(tmp_path.parent) == before


def test_image_save_inside_the_output_root_writes(engine, tmp_path) -> None:
    """Control case: a relative path (and an absolute one inside the root) are written there."""
    for path in ("sub/ok.png", str(tmp_path / "out" / "abs.png")):
        graph = with_save({"version": 1, "nodes": {"grad": gradient_image()}, "outputs": {}}, link("grad", "image"),
                          path)
        written = Path(engine.run(graph).outputs["file"])
        assert written.is_file() and written.resolve().parent.is_relative_to((tmp_path / "out").resolve())


@pytest.fixture
def secret_png(engine, tmp_path) -> Path:
    """A PNG beside (outside) the input root, plus one inside it."""
    graph = with_save({"version": 1, "nodes": {"grad": gradient_image()}, "outputs": {}}, link("grad", "image"),
                      "made.png")
    made = Path(engine.run(graph).outputs["file"])
    secret = tmp_path / "secret.png"
    shutil.move(made, secret)
    shutil.copy(secret, tmp_path / "in" / "inside.png")
    return secret


@pytest.mark.parametrize("which", ["dotdot", "nested", "absolute", "symlink"])
def test_image_load_outside_the_input_root_is_refused(engine, tmp_path, secret_png, which) -> None:
    path = {"dotdot": "../secret.png", "nested": "a/../../secret.png", "absolute": str(secret_png),
            "symlink": "link.png"}[which]
    if which == "symlink":
        (tmp_path / "in" / "link.png").symlink_to(secret_png)
    graph = {"version": 1, "nodes": {"load": {"type": "image.load", "inputs": {"path": path}}}, "outputs": {}}
    graph = with_save(graph, link("load", "image"), "copy.png")
    before = files_under(tmp_path)
    with pytest.raises(NodeExecutionError) as err:
        engine.run(graph)
    exc = err.value
    assert (exc.node, exc.node_type) == ("load", "image.load")
    assert isinstance(exc.error, PermissionError) and "outside the input root" in str(exc.error)
    assert files_under(tmp_path) == before


def test_image_load_inside_the_input_root_reads(engine, tmp_path, secret_png) -> None:
    graph = {"version": 1, "nodes": {"load": {"type": "image.load", "inputs": {"path": "inside.png"}}},
             "outputs": {"image": link("load", "image")}}
    image = engine.run(graph).outputs["image"]
    assert image.shape == (1, 3, SIZE, SIZE) and 0 <= image.min() and image.max() <= 1


# ---------------------------------------------------------------------------------------------------------
# unknown model names
# ---------------------------------------------------------------------------------------------------------


SHIPPED_MODELS = sorted(f"tiny-shapes/{p.parent.name}" for p in
                        (nodes.model_nodes.WEIGHTS_ROOT / "tiny-shapes").glob("*/config.json"))


def test_unknown_model_is_a_validation_error_listing_shipped_models(engine, tiny_models, weights_never_read) -> None:
    assert len(SHIPPED_MODELS) >= 6, SHIPPED_MODELS
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["unet"]["inputs"]["path"] = "tiny-shapes/no-such-model"
    issues = engine.validate(graph).issues
    found = [i for i in issues if i.code == "unknown_model"]
    assert [(i.node, i.port) for i in found] == [("unet", "path")], issues
    assert "tiny-shapes/no-such-model" in found[0].message
    assert found[0].hint and str(nodes.model_nodes.WEIGHTS_ROOT) in found[0].hint
    assert all(name in found[0].hint for name in SHIPPED_MODELS), found[0].hint
    with pytest.raises(GraphValidationError):
        engine.run(graph)
    assert weights_never_read == []


def test_unknown_model_hint_lists_installed_models(tiny_models, tmp_path) -> None:
    """With models installed in a model root, the hint names them and the names resolve."""
    root = tmp_path / "models"
    shutil.copytree(tiny_models.unet, root / "diffusion_models" / "tiny-fam" / "unet")
    shutil.copytree(tiny_models.vae, root / "vae" / "tiny-fam" / "vae")
    shutil.copytree(tiny_models.text, root / "text_encoders" / "tiny-fam" / "text")
    engine = Engine(device="cpu", model_roots=[root], input_root=tmp_path, output_root=tmp_path / "out")
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["unet"]["inputs"]["path"] = "tiny-fam/unett"
    (issue,) = [i for i in engine.validate(graph).issues if i.code == "unknown_model"]
    assert "tiny-fam/unet" in issue.hint and "tiny-shapes/unet" in issue.hint
    for name, component in (("unet", "unet"), ("vae", "vae"), ("text", "text")):
        graph["nodes"][name]["inputs"]["path"] = f"tiny-fam/{component}"
    assert engine.validate(graph).issues == []


def test_model_of_the_wrong_kind_is_a_validation_error(engine, tiny_models) -> None:
    graph = txt2img_graph(tiny_models)
    graph["nodes"]["vae"]["inputs"]["path"] = tiny_models.unet
    issues = engine.validate(graph).issues
    assert ("wrong_model", "vae", "path") in codes(issues), issues


def assert_refused_before_loading(engine, graph, weights_never_read, tmp_path) -> None:
    """Running the graph raises GraphValidationError, no weights were read and no output was written."""
    with pytest.raises(GraphValidationError):
        engine.run(graph)
    assert weights_never_read == []
    assert not (tmp_path / "out" / "result.png").exists()
