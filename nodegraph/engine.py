"""The embedding API.

    from nodegraph import Engine
    engine = Engine(device="auto", cache_dir=".cache/nodegraph")
    result = engine.run("graphs/noisy_gradient.json", overrides={"noise.seed": 2}, outputs=["image"])
    image = result.outputs["image"]; print(result.report.executed, result.report.cached)

State and threads: an Engine owns its cache, residency manager, event bus and executor; two Engines in one
process share nothing but the node registry (which is read-only once loaded). One Engine may be used from
several threads: the cache and the residency manager are locked, and each ``run`` has its own run state; runs
that share a model on the same device are serialised only by the model's pin, not by the Engine. Values handed
back are the cached objects themselves — treat them as read-only (they are inference tensors unless produced
by a gradient step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .cache import Cache
from .devices import ResidencyManager, resolve_device
from .errors import GraphValidationError, Issue
from .events import CancelToken, Event, EventBus
from .executor import LocalExecutor, RunReport
from .graph import Graph
from .node import Context
from .plan import Plan, build_plan
from .registry import Registry
from .validate import ValidationResult, validate

_DEFAULT_REGISTRY: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry of entry-point and ``NODEGRAPH_PLUGIN_PATH`` packs (loaded once)."""
    global _DEFAULT_REGISTRY
    if _DEFAULT_REGISTRY is None:
        _DEFAULT_REGISTRY = Registry.discover()
    return _DEFAULT_REGISTRY


def load_graph_source(source: Any) -> Any:
    """Accept a Graph, a dict, JSON text/bytes, or a path to a ``.json`` / ``.msgpack`` file."""
    if not isinstance(source, (str, Path)) or (isinstance(source, str) and source.lstrip().startswith("{")):
        return source  # a Graph, dict, JSON text or bytes; anything else is reported by validation as bad_graph
    path = Path(source)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise GraphValidationError([Issue("bad_json", f"cannot read graph file {str(path)!r}: {reason}")])
    if path.suffix == ".msgpack":
        from .serialize import SerializationError, unpackb

        try:
            return unpackb(data)
        except SerializationError as exc:
            raise GraphValidationError([Issue("bad_json", f"cannot decode msgpack graph: {exc}")])
    return data


@dataclass
class RunResult:
    outputs: dict[str, Any]
    report: RunReport
    graph: Graph
    plan: Plan
    output_types: dict[str, Any]


class Engine:
    """Validates, plans, caches, places and runs graphs. See the module docstring for thread-safety."""

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        memory_budget: int = 2 << 30,
        model_budgets: Mapping[str, int] | None = None,
        input_root: str | Path = ".",
        output_root: str | Path = "out",
        plugin_dirs: list[str | Path] | tuple = (),
        max_workers: int | None = None,
    ):
        registry = default_registry() if registry is None else registry
        if plugin_dirs:  # extend a copy: the registry handed in (or the shared default) is never changed
            registry = registry.copy()
            for folder in plugin_dirs:
                registry.load_folder(folder)
        self.registry = registry
        self.device = device
        resolve_device(device)  # fail early on an unusable default device
        self.cache = Cache(memory_budget, cache_dir)
        self.residency = ResidencyManager(dict(model_budgets or {}))
        self.bus = EventBus()
        self.input_root = Path(input_root).resolve()
        self.output_root = Path(output_root).resolve()
        self.executor = LocalExecutor(self.cache, self.residency, self.bus, default_device=device,
                                      max_workers=max_workers, input_root=self.input_root,
                                      output_root=self.output_root)

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(fn)

    def validate(self, graph: Any, overrides: Mapping[str, Any] | None = None) -> ValidationResult:
        try:
            source = load_graph_source(graph)
        except GraphValidationError as exc:
            return ValidationResult(None, exc.issues)
        result = validate(source, self.registry, overrides)
        if result.ok:
            result.issues.extend(self._device_issues(result))
        return result

    def _device_issues(self, result: ValidationResult) -> list[Issue]:
        """Device pins that cannot be honoured here, in the graph and inside loop bodies / graph-defined nodes."""
        issues = []

        def walk(scope: Any, prefix: str) -> None:
            for nid, cn in scope.nodes.items():
                if cn.spec.device is not None:
                    try:
                        resolve_device(cn.spec.device, self.device)
                    except (RuntimeError, ValueError) as exc:
                        issues.append(Issue("bad_device", str(exc), prefix + nid, None))
                if cn.body is not None:
                    walk(cn.body, f"{prefix}{nid}/")

        walk(result.scope, "")
        return issues

    def plan(self, graph: Any, overrides: Mapping[str, Any] | None = None) -> tuple[Plan, ValidationResult]:
        """Validate and plan; raise :class:`GraphValidationError` listing every problem."""
        result = self.validate(graph, overrides)
        if not result.ok:
            raise GraphValidationError(result.issues)
        ctx = Context("<fingerprint>", None, input_root=self.input_root, output_root=self.output_root)
        return build_plan(result.scope, default_device=None, fingerprint_ctx=ctx), result

    def run(
        self,
        graph: Any,
        overrides: Mapping[str, Any] | None = None,
        outputs: list[str] | None = None,
        *,
        cancel: CancelToken | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> RunResult:
        """Validate, plan and execute; return the requested outputs and a :class:`RunReport`."""
        plan, result = self.plan(graph, overrides)
        names = list(plan.outputs) if outputs is None else list(outputs)
        unknown = [n for n in names if n not in plan.outputs]
        if unknown:
            raise GraphValidationError([
                Issue("bad_output", f"the graph has no output {n!r}", None, n, f"outputs: {sorted(plan.outputs)}")
                for n in unknown
            ])
        unsubscribe = self.bus.subscribe(on_event) if on_event is not None else None
        try:
            values, report = self.executor.run(plan, names, cancel)
        finally:
            if unsubscribe is not None:
                unsubscribe()
        types = {n: result.scope.output_types.get(n) for n in names}
        return RunResult(values, report, result.graph, plan, types)
