"""The node registry and plugin discovery.

Node packs come from three places, all loaded the same way:

* the ``nodegraph.nodes`` entry-point group (the built-in ``nodes/`` library registers here too, exactly like a
  third-party pack; nothing in ``nodegraph/`` imports it),
* plugin folders given by the ``--plugins`` CLI flag, the ``NODEGRAPH_PLUGIN_PATH`` environment variable
  (``os.pathsep``-separated) or the ``plugin_dirs`` API argument: each ``*.py`` file and each package folder is
  a pack, each ``*.json`` file holding a graph-defined node type is registered under the folder's name,
* :meth:`Registry.add_module` / :meth:`Registry.add` from Python.

A pack object is either a callable ``register(registry, pack_name)``, a module defining such a ``register``
function (it is called), or a module whose functions decorated with :func:`nodegraph.node` are collected
(functions it merely imports are not), plus an optional ``GRAPH_NODES`` list of JSON paths or dicts.

Policy: a pack that fails to import or register is recorded in :attr:`Registry.failures` (pack name + error)
and the other packs still load; a pack is added all-or-nothing; a duplicate type id is an error naming both
packs. The registry is the only state Engines share; it is read-only once loaded (loading is locked).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from . import types as T
from .errors import PluginError
from .graph import Subgraph
from .node import InputDef, NodeDef, _adapter_for, parse_semver, takes_two

ENTRY_POINT_GROUP = "nodegraph.nodes"
PLUGIN_PATH_ENV = "NODEGRAPH_PLUGIN_PATH"


@dataclass(frozen=True)
class PackFailure:
    """A node pack that could not be loaded."""

    pack: str
    source: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"pack": self.pack, "source": self.source, "error": self.error}


@dataclass(frozen=True)
class GraphReader:
    """A pack's reader of another program's graph format (see :meth:`Registry.add_reader`)."""

    name: str
    detect: Callable[[Any], bool]
    convert: Callable[[Any, "Registry"], dict]
    stages: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # intermediate forms, by name (CLI --api)


class Registry:
    """Maps node type ids to :class:`NodeDef` and remembers which pack each came from."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeDef] = {}
        self.packs: dict[str, list[str]] = {}
        self.failures: list[PackFailure] = []
        self.model_folders: list[tuple[str, Path]] = []  # (model folder kind, path) that packs ship
        self.readers: list[GraphReader] = []  # other programs' graph formats, converted to ours (packs add them)
        self._lock = threading.RLock()

    # -- lookup ------------------------------------------------------------------------------------------
    def get(self, type_id: str) -> NodeDef | None:
        return self._nodes.get(type_id)

    def __contains__(self, type_id: str) -> bool:
        return type_id in self._nodes

    def __iter__(self):
        return iter(sorted(self._nodes.values(), key=lambda d: d.type_id))

    def __len__(self) -> int:
        return len(self._nodes)

    def type_ids(self) -> list[str]:
        return sorted(self._nodes)

    def copy(self) -> "Registry":
        """An independent registry with the same node types, packs and failures (to extend without mutating)."""
        new = Registry()
        new._nodes.update(self._nodes)
        new.packs.update({k: list(v) for k, v in self.packs.items()})
        new.failures.extend(self.failures)
        new.model_folders.extend(self.model_folders)
        new.readers.extend(self.readers)
        return new

    # -- adding ------------------------------------------------------------------------------------------
    def add(self, defs: NodeDef | Iterable[NodeDef], pack: str = "<api>") -> None:
        """Add node definitions as one pack, all or nothing. Raises PluginError on a duplicate id."""
        batch = [defs] if isinstance(defs, NodeDef) else list(defs)
        with self._lock:
            seen: dict[str, NodeDef] = {}
            for d in batch:
                other = self._nodes.get(d.type_id) or seen.get(d.type_id)
                if other is not None:
                    raise PluginError(
                        f"duplicate node type {d.type_id!r}: defined by pack {other.pack!r} and by pack {pack!r}"
                    )
                seen[d.type_id] = d
            for d in batch:
                d.pack = pack
                self._nodes[d.type_id] = d
            self.packs.setdefault(pack, []).extend(d.type_id for d in batch)

    def add_model_folder(self, folder: str, path: str | Path) -> None:
        """Let model names of kind ``folder`` (``diffusion_models``, ``vae``, ...; see nodegraph.roots) also
        resolve inside ``path``, after the user's model roots. A pack calls this for the weights it ships."""
        from .roots import MODEL_FOLDERS

        if folder not in MODEL_FOLDERS:
            raise PluginError(f"unknown model folder {folder!r}; known: {sorted(MODEL_FOLDERS)}")
        with self._lock:
            self.model_folders.append((folder, Path(path)))

    def add_reader(self, reader: "GraphReader") -> None:
        """Let graph files of another program's format (detected from their content) run: ``reader.detect(doc)``
        says whether a document (a decoded JSON value, or the raw bytes of a non-JSON file such as a PNG) is one,
        ``reader.convert(doc, registry)`` returns the graph in this engine's format or raises
        :class:`nodegraph.errors.GraphValidationError` with issues naming the foreign nodes."""
        with self._lock:
            if any(r.name == reader.name for r in self.readers):
                raise PluginError(f"duplicate graph reader {reader.name!r}")
            self.readers.append(reader)

    def add_module(self, module: ModuleType, pack: str | None = None) -> None:
        """Register every decorated function of a module (and its ``GRAPH_NODES``) as one pack."""
        pack = pack or module.__name__
        defs = [obj.__node_def__ for obj in vars(module).values()
                if hasattr(obj, "__node_def__") and getattr(obj, "__module__", None) == module.__name__]
        base = Path(getattr(module, "__file__", "") or ".").parent
        for item in getattr(module, "GRAPH_NODES", ()):
            defs.append(graph_node_def(_read_json(base / item) if isinstance(item, (str, Path)) else item))
        self.add(defs, pack)

    def add_graph_node(self, definition: dict[str, Any] | str | Path, pack: str = "<api>") -> NodeDef:
        """Register a graph-defined node type from a dict or a JSON file."""
        data = _read_json(Path(definition)) if isinstance(definition, (str, Path)) else definition
        d = graph_node_def(data)
        self.add(d, pack)
        return d

    def load_pack(self, name: str, loader, source: str) -> bool:
        """Run ``loader()`` to get a pack object and register it; record a failure instead of raising."""
        try:
            obj = loader()
            if isinstance(obj, ModuleType) and callable(getattr(obj, "register", None)):
                obj = obj.register
            if isinstance(obj, ModuleType):
                self.add_module(obj, name)
            elif callable(obj):
                staging = Registry()  # the pack registers into a scratch registry, then joins all or nothing
                obj(staging, name) if takes_two(obj) else obj(staging)
                self.add(list(staging._nodes.values()), name)
                self.model_folders.extend(staging.model_folders)
                for reader in staging.readers:
                    self.add_reader(reader)
            else:
                raise PluginError(f"entry point resolved to {type(obj).__name__}, expected a module or callable")
            return True
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken pack (sys.exit() at import too) must
            if isinstance(exc, SystemExit):  # not stop the others, nor the command that loads it
                exc = PluginError(f"the pack called sys.exit({exc.code!r}) while loading")
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.failures.append(PackFailure(name, source, detail))
            return False

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            self.load_pack(ep.name, ep.load, f"entry point {ep.value}")

    def load_folder(self, folder: str | Path) -> None:
        """Load every ``*.py`` file, package folder and graph-node ``*.json`` file of a plugin folder."""
        folder = Path(folder)
        if not folder.is_dir():
            self.failures.append(PackFailure(folder.name, str(folder), "plugin folder does not exist"))
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")):
                continue
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                self.load_pack(path.stem, lambda p=path: _import_path(p), str(path))
            elif path.suffix == ".json":
                self.load_pack(f"{folder.name}/{path.stem}", lambda p=path: _graph_pack(p), str(path))

    @classmethod
    def discover(cls, plugin_dirs: Iterable[str | Path] = (), *, entry_points: bool = True) -> "Registry":
        """A registry with the entry-point packs, the env-var folders and ``plugin_dirs`` loaded."""
        reg = cls()
        if entry_points:
            reg.load_entry_points()
        env = [p for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
        for folder in [*env, *plugin_dirs]:
            reg.load_folder(folder)
        return reg


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _graph_pack(path: Path):
    def register(reg: Registry) -> None:
        reg.add_graph_node(path)

    return register


def _import_path(path: Path) -> ModuleType:
    init = path / "__init__.py" if path.is_dir() else path
    name = f"nodegraph_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(path)] if path.is_dir() else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def graph_node_def(data: dict[str, Any]) -> NodeDef:
    """Build a :class:`NodeDef` whose implementation is a subgraph with declared inputs and outputs."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise PluginError("a graph-defined node needs a string 'type'")
    meta_keys = {"type", "version", "category", "description", "output_types"}
    sub = Subgraph.model_validate({k: v for k, v in data.items() if k not in meta_keys})
    version = str(data.get("version", "1.0.0"))
    parse_semver(version)
    inputs: dict[str, InputDef] = {}
    for name, decl in sub.inputs.items():
        ptype = T.parse_type(decl.type)
        required = not decl.optional and decl.default is None
        inputs[name] = InputDef(name, ptype, required, decl.default, decl.description, _adapter_for(
            T.PY_TYPES.get(ptype.name, Any), None, ptype))
    declared = data.get("output_types") or {}
    outputs = {name: T.parse_type(declared.get(name, "Any")) for name in sub.outputs}
    return NodeDef(
        type_id=data["type"],
        version=version,
        fn=None,
        inputs=inputs,
        outputs=outputs,
        category=str(data.get("category", "graph")),
        description=str(data.get("description", "")),
        kind="graph",
        subgraph=sub,
        single_output=False,
        extra={"output_types_declared": bool(declared), "definition": data},
    )

