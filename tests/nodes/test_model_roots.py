"""Model names resolve inside model roots only, once per node (nodes.model_nodes, nodegraph.roots).

* a shipped component copied into a root in ComfyUI's layout (``ROOT/vae/myvae``, ...) loads by name through
  ``Engine(model_roots=[ROOT])``, the ``NODEGRAPH_MODELS`` variable and the CLI's ``--models``; the shipped names
  (``tiny-shapes/vae``) keep working beside them;
* absolute paths, ``~``, ``..``, NUL: ``bad_model_name`` at validation (also through ``--set``), nothing runs;
* an unknown name: ``unknown_model`` whose hint lists what each root holds;
* a foreign ``config.json`` / ``denoiser.json``: reported without quoting any of its values;
* the config of each loader is read once per validation + run, and handed to refine, fingerprint and the load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import nodes.adapters
import nodes.model_nodes
import nodes.models.config
from nodegraph import Engine, GraphValidationError, NodeExecutionError
from nodegraph.cli import main
from nodegraph.roots import MODELS_ENV, ModelRoots
from nodes.model_nodes import VAE, WEIGHTS_ROOT, load_vae, resolve_model
from nodes.models.config import load_folder

SHIPPED = WEIGHTS_ROOT / "tiny-shapes"
SECRET = "SECRET-7f3a"  # planted in hostile files; must never reach a message or a hint


def copy_into(root: Path, folder: str, name: str, component: str) -> Path:
    dst = root / folder / name
    shutil.copytree(SHIPPED / component, dst)
    return dst


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A model root in ComfyUI's layout holding a copied shipped VAE (``vae/myvae``) and nothing else."""
    root = tmp_path / "models"
    copy_into(root, "vae", "myvae", "vae")
    return root


@pytest.fixture
def make_engine(tmp_path: Path):
    (tmp_path / "in").mkdir(exist_ok=True)

    def make(**kw: Any) -> Engine:
        return Engine(device="cpu", input_root=tmp_path / "in", output_root=tmp_path / "out", **kw)

    return make


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every checkpoint folder whose weights are loaded (to prove a refused graph loads nothing)."""
    calls: list[Path] = []
    real = nodes.model_nodes.load_folder

    def recording(folder, *args: Any, **kwargs: Any):
        calls.append(Path(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(nodes.model_nodes, "load_folder", recording)
    return calls


def vae_graph(name: str) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "vae": {"type": "model.load_vae", "inputs": {"path": name}},
        "empty": {"type": "latent.empty", "inputs": {"vae": {"node": "vae", "output": "vae"}, "width": 16,
                                                     "height": 16}},
    }, "outputs": {"vae": {"node": "vae", "output": "vae"}, "latent": {"node": "empty", "output": "latent"}}}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def issues_of(result) -> list[tuple[str, str | None, str | None]]:
    return [(i.code, i.node, i.port) for i in result.issues]


# ---------------------------------------------------------------------------------------------------------
# names in roots
# ---------------------------------------------------------------------------------------------------------


def test_a_vae_copied_into_a_root_loads_by_name(root, make_engine, loads) -> None:
    engine = make_engine(model_roots=[root])
    out = engine.run(vae_graph("myvae")).outputs
    assert loads == [(root / "vae" / "myvae").resolve()]
    assert same_weights(out["vae"], load_folder(SHIPPED / "vae"))
    assert out["latent"].shape == (1, 4, 4, 4)  # the shipped VAE: 4 channels, factor 4


def test_shipped_names_still_resolve_beside_the_roots(root, make_engine) -> None:
    engine = make_engine(model_roots=[root])
    out = engine.run(vae_graph("tiny-shapes/vae")).outputs
    assert same_weights(out["vae"], load_folder(SHIPPED / "vae"))
    graph = json.loads((WEIGHTS_ROOT.parents[1] / "graphs" / "controlnet.json").read_text())
    assert engine.validate(graph).issues == []


def test_each_loader_looks_in_its_own_comfyui_folder(root, make_engine) -> None:
    """diffusion_models/ (and its older name unet/), text_encoders/ (older: clip/), controlnet/; a name is
    found only in its loader's folder (links inside a root are followed)."""
    (root / "diffusion_models").mkdir()
    (root / "diffusion_models" / "mydit").symlink_to(SHIPPED / "dit")
    copy_into(root, "unet", "myunet", "unet")
    copy_into(root, "clip", "mytext", "text")
    copy_into(root, "controlnet", "sub/mycn", "controlnet_unet")  # a grouping subfolder, as ComfyUI users do
    engine = make_engine(model_roots=[root])
    graph = {"version": 1, "nodes": {
        "dit": {"type": "model.load_denoiser", "inputs": {"path": "mydit"}},
        "unet": {"type": "model.load_denoiser", "inputs": {"path": "myunet"}},
        "text": {"type": "model.load_text_encoder", "inputs": {"path": "mytext"}},
        "cn": {"type": "model.load_controlnet", "inputs": {"path": "sub/mycn"}},
    }, "outputs": {"dit": {"node": "dit", "output": "model"}}}
    result = engine.validate(graph)
    assert result.issues == []
    assert result.scope.nodes["cn"].output_types["controlnet"].param("space") == "tiny-shapes"
    assert engine.run(graph).outputs["dit"].kind == "flow"
    graph["nodes"]["text"]["inputs"]["path"] = "myvae"  # a VAE's name is not a text encoder's
    assert issues_of(engine.validate(graph)) == [("unknown_model", "text", "path")]


def test_models_env_var_adds_a_root(root, make_engine, monkeypatch) -> None:
    monkeypatch.setenv(MODELS_ENV, os.pathsep.join([str(root.parent / "missing"), str(root)]))
    engine = make_engine()
    assert root.resolve() in engine.models.roots
    assert same_weights(engine.run(vae_graph("myvae")).outputs["vae"], load_folder(SHIPPED / "vae"))
    monkeypatch.delenv(MODELS_ENV)
    assert issues_of(make_engine().validate(vae_graph("myvae"))) == [("unknown_model", "vae", "path")]


def test_earlier_roots_win(root, tmp_path, make_engine) -> None:
    other = tmp_path / "other"
    copy_into(other, "vae", "myvae", "vae")
    (other / "vae" / "myvae" / "config.json").write_text(json.dumps({"model_type": "unet"}))
    assert make_engine(model_roots=[root, other]).validate(vae_graph("myvae")).issues == []
    assert issues_of(make_engine(model_roots=[other, root]).validate(vae_graph("myvae"))) == [
        ("wrong_model", "vae", "path")]


def test_plain_python_call_resolves_shipped_names_and_env_roots(root, monkeypatch) -> None:
    assert same_weights(load_vae("tiny-shapes/vae"), load_folder(SHIPPED / "vae"))
    monkeypatch.setenv(MODELS_ENV, str(root))
    assert resolve_model("myvae", VAE).folder == (root / "vae" / "myvae").resolve()
    with pytest.raises(ValueError, match="is a path") as err:
        load_vae(str(SHIPPED / "vae"))
    assert err.value.code == "bad_model_name"


# ---------------------------------------------------------------------------------------------------------
# names that are paths
# ---------------------------------------------------------------------------------------------------------


def escaping_names(root: Path) -> dict[str, str]:
    return {"absolute": str(root / "vae" / "myvae"), "dotdot": "../..", "home": "~/x", "nested": "vae/../../x",
            "inner-dot": "./myvae", "backslash": "..\\vae\\myvae", "nul": "myvae\x00", "empty": "",
            "drive": "C:/models/vae"}


@pytest.mark.parametrize("which", list(escaping_names(Path("/r"))))
def test_names_that_are_paths_are_refused_at_validation(root, make_engine, loads, which) -> None:
    name = escaping_names(root)[which]
    engine = make_engine(model_roots=[root])
    result = engine.validate(vae_graph(name))
    assert issues_of(result) == [("bad_model_name", "vae", "path")], result.issues
    events = []
    with pytest.raises(GraphValidationError):
        engine.run(vae_graph(name), on_event=events.append)
    assert loads == [] and events == []


def test_a_name_given_to_a_graph_defined_node_is_resolved_at_validation(root, make_engine, loads) -> None:
    # The loader sits inside a graph-defined node and gets its name through {"input": ...}: validation still
    # sees the literal, so the port is typed from the model and a path is refused before anything runs.
    from nodegraph import Registry
    from nodegraph.engine import default_registry

    reg: Registry = default_registry().copy()
    reg.add_graph_node({"type": "test.vae_by_name", "inputs": {"name": {"type": "String"}},
                        "nodes": {"ld": {"type": "model.load_vae", "inputs": {"path": {"input": "name"}}}},
                        "outputs": {"vae": {"node": "ld", "output": "vae"}}}, "test")
    engine = Engine(reg, device="cpu", model_roots=[root])
    graph = {"version": 1, "nodes": {"w": {"type": "test.vae_by_name", "inputs": {"name": "../../x"}}},
             "outputs": {"vae": {"node": "w", "output": "vae"}}}
    assert issues_of(engine.validate(graph)) == [("bad_model_name", "w/ld", "path")]
    graph["nodes"]["w"]["inputs"]["name"] = "myvae"
    result = engine.validate(graph)
    assert result.ok and result.scope.output_types["vae"].param("space") is not None
    assert loads == []


def test_a_path_given_with_set_is_refused_too(root, make_engine, loads) -> None:
    engine = make_engine(model_roots=[root])
    result = engine.validate(vae_graph("myvae"), overrides={"vae.path": str(SHIPPED / "vae")})
    assert issues_of(result) == [("bad_model_name", "vae", "path")]
    assert loads == []


def test_the_embedding_api_may_allow_absolute_folders(root, make_engine) -> None:
    engine = make_engine(model_roots=ModelRoots((root.resolve(),), allow_paths=True))
    assert engine.validate(vae_graph(str(SHIPPED / "vae"))).issues == []
    assert engine.validate(vae_graph("myvae")).issues == []
    assert issues_of(engine.validate(vae_graph("../vae/myvae"))) == [("bad_model_name", "vae", "path")]
    assert issues_of(engine.validate(vae_graph(str(root / "nowhere")))) == [("unknown_model", "vae", "path")]


def test_a_linked_name_is_resolved_when_the_node_runs_and_confined_there(root, make_engine, loads) -> None:
    """In a loop body the path comes from ``item``: validation cannot resolve it, the running node does."""
    def graph(names: list[str]) -> dict[str, Any]:
        body = {"inputs": {}, "nodes": {
            "vae": {"type": "model.load_vae", "inputs": {"path": {"input": "item"}}},
            "empty": {"type": "latent.empty", "inputs": {"vae": {"node": "vae", "output": "vae"}, "width": 16,
                                                         "height": 16}}},
            "outputs": {"latent": {"node": "empty", "output": "latent"}}}
        return {"version": 1, "nodes": {"loop": {"type": "loop", "inputs": {"over": names}, "body": body}},
                "outputs": {"latents": {"node": "loop", "output": "latent"}}}

    engine = make_engine(model_roots=[root])
    out = engine.run(graph(["myvae", "tiny-shapes/vae"])).outputs
    assert out["latents"].shape == (2, 1, 4, 4, 4)
    assert loads == [(root / "vae" / "myvae").resolve(), SHIPPED / "vae"]
    with pytest.raises(NodeExecutionError) as err:
        engine.run(graph(["myvae", str(SHIPPED / "vae")]))
    assert getattr(err.value.error, "code", None) == "bad_model_name"


# ---------------------------------------------------------------------------------------------------------
# unknown names and foreign folders
# ---------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_what_each_root_holds(root, tmp_path, make_engine) -> None:
    second = tmp_path / "second"
    copy_into(second, "vae", "group/deep", "vae")
    engine = make_engine(model_roots=[root, second])
    (issue,) = engine.validate(vae_graph("myvea")).issues
    assert (issue.code, issue.node, issue.port) == ("unknown_model", "vae", "path")
    assert "'myvea'" in issue.message and "vae/" in issue.message
    for expected in (str(root.resolve()), "myvae", str(second.resolve()), "group/deep", "tiny-shapes/vae"):
        assert expected in issue.hint, issue.hint


def test_no_roots_configured_still_lists_the_shipped_models(make_engine, monkeypatch) -> None:
    monkeypatch.delenv(MODELS_ENV, raising=False)
    (issue,) = make_engine().validate(vae_graph("myvae")).issues
    assert issue.code == "unknown_model"
    assert "tiny-shapes/vae" in issue.hint and "tiny-shapes/dit" in issue.hint


HOSTILE_CONFIGS = {
    "model_type": {"model_type": f"<img src=x onerror=alert(1)>{SECRET}", "space": "x"},
    "field_name": {**json.loads((SHIPPED / "vae" / "config.json").read_text()), f"{SECRET}_field": 1},
    "string_value": {**json.loads((SHIPPED / "vae" / "config.json").read_text()), "space": f"\x1b[31m{SECRET}"},
    "wrong_type": {**json.loads((SHIPPED / "vae" / "config.json").read_text()), "latent_channels": SECRET},
    "not_json": f"{{\"model_type\": \"vae\", {SECRET}",
    "not_an_object": [SECRET],
}
EXPECTED_CODES = {"model_type": "wrong_model"}


@pytest.mark.parametrize("kind", list(HOSTILE_CONFIGS))
def test_a_foreign_config_is_reported_without_its_values(root, make_engine, loads, kind) -> None:
    folder = root / "vae" / "evil"
    shutil.copytree(SHIPPED / "vae", folder)
    content = HOSTILE_CONFIGS[kind]
    (folder / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    (issue,) = make_engine(model_roots=[root]).validate(vae_graph("evil")).issues
    assert (issue.code, issue.node, issue.port) == (EXPECTED_CODES.get(kind, "bad_checkpoint"), "vae", "path")
    assert "'evil'" in issue.message or str(folder.resolve()) in issue.message
    text = f"{issue.message} {issue.hint or ''}"
    assert SECRET not in text and "<img" not in text and "\x1b" not in text, text
    if kind == "model_type":
        assert "another kind" in issue.message and "not vae" in issue.message
    assert loads == []


def test_a_foreign_denoiser_json_is_reported_without_its_values(root, make_engine) -> None:
    folder = copy_into(root, "diffusion_models", "evil", "unet")
    for sidecar in ({"prediction": SECRET}, {"latent_space": f"<{SECRET}>"}, {SECRET: 1}, f"[{SECRET}"):
        (folder / "denoiser.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
        graph = {"version": 1, "nodes": {"unet": {"type": "model.load_denoiser", "inputs": {"path": "evil"}}},
                 "outputs": {}}
        (issue,) = make_engine(model_roots=[root]).validate(graph).issues
        assert (issue.code, issue.port) == ("bad_checkpoint", "path")
        assert SECRET not in issue.message and "denoiser.json" in issue.message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_in_place_of_config_json_is_refused_without_blocking(root, make_engine) -> None:
    folder = root / "vae" / "fifo"
    shutil.copytree(SHIPPED / "vae", folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    (issue,) = make_engine(model_roots=[root]).validate(vae_graph("fifo")).issues
    assert (issue.code, issue.port) == ("bad_checkpoint", "path")


# ---------------------------------------------------------------------------------------------------------
# resolve once
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every read of a ``config.json`` (through the one reader) and of a ``denoiser.json``, by folder name."""
    seen: dict[str, list[str]] = {"config": [], "denoiser": []}
    real_read, real_info = nodes.models.config.read_bytes, nodes.adapters.DenoiserInfo.read.__func__

    def read_bytes(path, *args: Any, **kwargs: Any) -> bytes:
        if Path(path).name == "config.json":
            seen["config"].append(Path(path).parent.name)
        return real_read(path, *args, **kwargs)

    def info(cls, folder):
        seen["denoiser"].append(Path(folder).name)
        return real_info(cls, folder)

    monkeypatch.setattr(nodes.models.config, "read_bytes", read_bytes)
    monkeypatch.setattr(nodes.adapters.DenoiserInfo, "read", classmethod(info))
    return seen


def four_loaders() -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "unet": {"type": "model.load_denoiser", "inputs": {"path": "tiny-shapes/unet"}},
        "vae": {"type": "model.load_vae", "inputs": {"path": "myvae"}},
        "text": {"type": "model.load_text_encoder", "inputs": {"path": "tiny-shapes/text"}},
        "cn": {"type": "model.load_controlnet", "inputs": {"path": "tiny-shapes/controlnet_unet"}},
        "empty": {"type": "latent.empty", "inputs": {"vae": {"node": "vae", "output": "vae"}, "width": 16,
                                                     "height": 16}},
    }, "outputs": {n: {"node": n, "output": o} for n, o in
                   [("unet", "model"), ("text", "encoder"), ("cn", "controlnet"), ("empty", "latent")]}}


def test_each_config_is_read_once_per_validation_and_run(root, make_engine, reads, loads) -> None:
    engine = make_engine(model_roots=[root])
    engine.run(four_loaders())
    assert sorted(reads["config"]) == ["controlnet_unet", "myvae", "text", "unet"]
    assert reads["denoiser"] == ["unet"]
    assert len(loads) == 4  # every loader ran, on what validation resolved
    engine.run(four_loaders())  # cached: validated (one more read each), nothing loaded again
    assert sorted(reads["config"]) == sorted(["controlnet_unet", "myvae", "text", "unet"] * 2)
    assert len(loads) == 4


def test_a_changed_checkpoint_changes_the_cache_key(root, make_engine, loads) -> None:
    engine = make_engine(model_roots=[root])
    engine.run(vae_graph("myvae"))
    engine.run(vae_graph("myvae"))
    assert len(loads) == 1
    weights = root / "vae" / "myvae" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    engine.run(vae_graph("myvae"))
    assert len(loads) == 2


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def test_cli_models_flag_adds_roots(root, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(MODELS_ENV, raising=False)
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(vae_graph("myvae") | {"outputs": {}}))
    common = ["validate", str(graph), "--json"]
    assert main([*common, "--models", str(tmp_path / "empty"), "--models", str(root)]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(common) != 0
    report = json.loads(capsys.readouterr().out)
    assert [(i["code"], i["node"], i["port"]) for i in report["errors"]] == [("unknown_model", "vae", "path")]
    assert main([*common, "--models", str(root), "--set", f"vae.path={SHIPPED / 'vae'}"]) != 0
    report = json.loads(capsys.readouterr().out)
    assert [i["code"] for i in report["errors"]] == ["bad_model_name"]
