"""The embedding API.

    from nodegraph import Engine
    engine = Engine(device="auto", cache_dir=".cache/nodegraph")
    result = engine.run("graphs/noisy_gradient.json", overrides={"noise.seed": 2}, outputs=["image"])
    image = result.outputs["image"]; print(result.report.executed, result.report.cached)

State and threads: an Engine owns its cache, residency manager, event bus and executor; two Engines in one
process share nothing but the node registry (which is read-only once loaded). One Engine may be used from
several threads: the cache and the residency manager are locked, and each ``run`` has its own run state; runs
that share a model on the same device are serialised only by the model's pin, not by the Engine. Values handed
back are the cached objects themselves — treat them as read-only (a node that changes an input in place fails,
see :mod:`nodegraph.values`; the caller is trusted not to).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .cache import Cache
from .devices import ResidencyManager, resolve_device
from .errors import GraphValidationError, Issue
from .events import CancelToken, Event, EventBus
from .executor import LocalExecutor, RunReport
from .graph import Graph
from .limits import DEFAULT_LIMITS, Limits
from .node import Context
from .plan import Plan, build_plan
from .registry import Registry
from .roots import ModelRoots
from .source import load_graph_source
from .validate import ValidationResult, validate

_DEFAULT_REGISTRY: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry of entry-point and ``NODEGRAPH_PLUGIN_PATH`` packs (loaded once)."""
    global _DEFAULT_REGISTRY
    if _DEFAULT_REGISTRY is None:
        _DEFAULT_REGISTRY = Registry.discover()
    return _DEFAULT_REGISTRY


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
        model_roots: "list[str | Path] | tuple | ModelRoots" = (),
        limits: Limits = DEFAULT_LIMITS,
        disk_budget: int | None = None,
    ):
        registry = default_registry() if registry is None else registry
        if plugin_dirs:  # extend a copy: the registry handed in (or the shared default) is never changed
            registry = registry.copy()
            for folder in plugin_dirs:
                registry.load_folder(folder)
        self.registry = registry
        self.device = device
        resolve_device(device)  # fail early on an unusable default device
        self.cache = Cache(memory_budget, cache_dir, disk_budget, limits=limits)
        self.residency = ResidencyManager(dict(model_budgets or {}))
        self.bus = EventBus()
        self.input_root = Path(input_root).resolve()
        self.output_root = Path(output_root).resolve()
        self.models = model_roots if isinstance(model_roots, ModelRoots) else ModelRoots.from_env(model_roots)
        for folder, path in registry.model_folders:  # folders node packs ship (the built-in tiny-shapes weights)
            self.models = self.models.with_folder(folder, path)
        self.limits = limits
        self.executor = LocalExecutor(self.cache, self.residency, self.bus, default_device=device,
                                      max_workers=max_workers, input_root=self.input_root,
                                      output_root=self.output_root, models=self.models, limits=limits)

    def context(self, node_id: str = "<engine>") -> Context:
        """The context validation hooks and fingerprints see: roots and limits, no device, no run."""
        return Context(node_id, None, input_root=self.input_root, output_root=self.output_root,
                       models=self.models, limits=self.limits)

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(fn)

    def validate(self, graph: Any, overrides: Mapping[str, Any] | None = None) -> ValidationResult:
        """Every problem of a graph (any accepted form, or a path) with overrides, under this engine's limits."""
        try:
            source = load_graph_source(graph, self.limits)
        except GraphValidationError as exc:
            return ValidationResult(None, exc.issues)
        result = validate(source, self.registry, overrides, ctx=self.context("<validate>"))
        if result.scope is not None:
            result.issues.extend(self._device_issues(result))
        return result

    def _device_issues(self, result: ValidationResult) -> list[Issue]:
        """Device pins that cannot be honoured here, in the graph and inside loop bodies / graph-defined nodes."""
        issues = []
        todo = [(result.scope, "")]
        while todo:
            scope, prefix = todo.pop()
            for nid, cn in scope.nodes.items():
                pin = cn.spec.device
                if pin is not None and not pin.strip():
                    issues.append(Issue("bad_device", "an empty device name; write 'cpu', 'cuda', 'cuda:N' or "
                                        "'mps', or leave 'device' out for the engine's device", prefix + nid, None))
                elif pin is not None:
                    try:
                        resolve_device(pin, self.device)
                    except (RuntimeError, ValueError, TypeError) as exc:
                        issues.append(Issue("bad_device", str(exc), prefix + nid, None))
                if cn.body is not None:
                    todo.append((cn.body, f"{prefix}{nid}/"))
        return sorted(issues, key=lambda i: i.node or "")

    def plan(self, graph: Any, overrides: Mapping[str, Any] | None = None) -> tuple[Plan, ValidationResult]:
        """Validate and plan; raise :class:`GraphValidationError` listing every problem."""
        result = self.validate(graph, overrides)
        if not result.ok:
            raise GraphValidationError(result.issues)
        return build_plan(result.scope, default_device=None, fingerprint_ctx=self.context("<fingerprint>")), result

    def run(
        self,
        graph: Any,
        overrides: Mapping[str, Any] | None = None,
        outputs: list[str] | None = None,
        *,
        cancel: CancelToken | None = None,
        on_event: Callable[[Event], None] | None = None,
        run_id: str | None = None,
    ) -> RunResult:
        """Validate, plan and execute; return the requested outputs and a :class:`RunReport`.

        ``on_event`` receives this run's events only (each carries ``run_id``, generated when not given)."""
        plan, result = self.plan(graph, overrides)
        names = list(plan.outputs) if outputs is None else list(outputs)
        unknown = [n for n in names if n not in plan.outputs]
        if unknown:
            raise GraphValidationError([
                Issue("bad_output", f"the graph has no output {n!r}", None, n, f"outputs: {sorted(plan.outputs)}")
                for n in unknown
            ])
        run_id = run_id or uuid.uuid4().hex
        unsubscribe = self.bus.subscribe(on_event, run_id=run_id) if on_event is not None else None
        try:
            values, report = self.executor.run(plan, names, cancel, run_id=run_id)
        finally:
            if unsubscribe is not None:
                unsubscribe()
        types = {n: result.scope.output_types.get(n) for n in names}
        report.warnings.extend(value_warnings(values, types))
        return RunResult(values, report, result.graph, plan, types)


def value_warnings(values: Mapping[str, Any], types: Mapping[str, Any]) -> list[str]:
    """Things worth a look in a run's outputs: tensors holding NaN or inf (an image saves them as black)."""
    import torch

    out = []
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                kind = getattr(types.get(name), "name", "Tensor")
                shown = " (a PNG shows them as black)" if kind == "Image" else ""
                out.append(f"output {name!r} holds {bad:,} non-finite values (NaN or inf) of {value.numel():,}{shown}")
    return out
