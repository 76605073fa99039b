"""The local executor: small functions over an explicit run state, one loop, an injected submit function.

Policy
------
1. **Resolve.** Walk back from the requested outputs. A step whose key is in the cache (memory, then disk) is
   *cached*: its value is taken and its ancestors are not visited. Every other visited step must *run*.
2. **Schedule.** Steps whose inputs are all available are *ready*. The main loop hands ready steps to
   ``submit`` (at most ``max_workers`` in flight), then blocks on the completion queue. Independent branches
   therefore run concurrently with the threaded submit; the synchronous submit runs each step inline (the easy
   one to debug); a remote executor would submit to workers and report on the same queue.
3. **Finish.** A finished step's outputs go to the cache at once (so a later failure or cancellation keeps
   them: the rerun resumes) and its dependents' wait counts drop. A value no remaining step needs is released
   from the run state (the cache may still hold it, within its budget).
4. **Fail / cancel.** On the first failure or on cancellation nothing new is submitted; steps in flight finish
   (and are cached); then :class:`NodeExecutionError` / :class:`Cancelled` is raised.

Each step runs under ``torch.inference_mode`` unless it (or its loop body) declares it needs gradients, in
which case it runs with autograd enabled and inference tensors among its inputs are cloned first. Tensors are
moved to the step's device at the edge only when they live elsewhere; models are made resident through the
residency manager and pinned while the step runs.
"""

from __future__ import annotations

import os
import queue
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .cache import MISSING, Cache
from .devices import ResidencyManager, move_to, resolve_device
from .errors import Cancelled, NodeExecutionError, summarize
from .events import CancelToken, EventBus
from .loop import run_loop
from .node import Context
from .plan import Arg, Const, Plan, Ref, Step

Submit = Callable[[Callable[[], None]], None]


@dataclass
class RunReport:
    """What a run did: which steps executed, which came from the cache, how long each took."""

    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """``{"executed": [...], "cached": [...], "seconds": {"total": s, "nodes": {id: s}}}``."""
        return {
            "executed": list(self.executed),
            "cached": list(self.cached),
            "seconds": {"total": round(self.total_seconds, 6),
                        "nodes": {k: round(v, 6) for k, v in self.seconds.items()}},
        }


@dataclass
class RunState:
    """The explicit state record of one run."""

    waiting: dict[str, int]  # step -> number of inputs not yet available
    dependents: dict[str, set[str]]  # step -> steps that consume it and must run
    remaining_uses: dict[str, int]  # step -> consumers that have not finished yet
    ready: deque[str]
    running: set[str] = field(default_factory=set)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: BaseException | None = None


def modules_in(value: Any) -> list[torch.nn.Module]:
    """Models a value carries: itself if it is a module, or what its ``__nodegraph_modules__()`` lists (wrappers
    such as guidance or ControlNet expose the networks they call this way, so each is charged once)."""
    if isinstance(value, torch.nn.Module):
        return [value]
    hook = getattr(value, "__nodegraph_modules__", None)
    return list(hook()) if callable(hook) else []


def synchronous_submit(fn: Callable[[], None]) -> None:
    fn()


@contextmanager
def grad_mode(enabled: bool) -> Iterator[None]:
    if enabled:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    else:
        with torch.inference_mode():
            yield


class LocalExecutor:
    """Runs plans in this process, on a thread pool (``max_workers > 1``) or inline (``max_workers == 1``)."""

    def __init__(self, cache: Cache, residency: ResidencyManager, bus: EventBus, *, default_device: str = "auto",
                 max_workers: int | None = None, input_root: Path | None = None, output_root: Path | None = None):
        self.cache = cache
        self.residency = residency
        self.bus = bus
        self.default_device = default_device
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.input_root = input_root
        self.output_root = output_root

    # -- helpers -----------------------------------------------------------------------------------------
    def device_for(self, name: str | None) -> torch.device:
        return resolve_device(name, self.default_device)

    def context(self, step: Step, cancel: CancelToken | None, device: torch.device | None = None) -> Context:
        return Context(step.id, device if device is not None else self.device_for(step.device), emit=self.bus.emit,
                       cancel=cancel, input_root=self.input_root, output_root=self.output_root,
                       residency=self.residency)

    # -- resolve ------------------------------------------------------------------------------------------
    def resolve(self, plan: Plan, outputs: list[str], report: RunReport) -> tuple[dict[str, dict], set[str],
                                                                                  dict[str, set[str]]]:
        """Find cached steps and the steps that must run. Returns (cached values, to_run, wanted outputs)."""
        wanted: dict[str, set[str]] = {sid: set() for sid in plan.steps}
        for name in outputs:
            src = plan.outputs[name]
            if isinstance(src, Ref):
                wanted[src.step].add(src.output)
        for sid in plan.needed(outputs):  # only consumers this run needs decide which outputs are wanted
            for src in plan.steps[sid].inputs.values():
                if isinstance(src, Ref):
                    wanted[src.step].add(src.output)
        cached: dict[str, dict[str, Any]] = {}
        to_run: set[str] = set()
        todo = [s.step for n in outputs if isinstance(s := plan.outputs[n], Ref)]
        while todo:
            sid = todo.pop()
            if sid in cached or sid in to_run:
                continue
            step = plan.steps[sid]
            value, tier = self.cache.get(step.key)
            if value is not MISSING and wanted[sid] <= set(value):
                cached[sid] = value
                report.cached.append(sid)
                self.bus.emit("cached", sid, tier=tier)
                continue
            to_run.add(sid)
            todo.extend(step.upstream())
        return cached, to_run, wanted

    # -- run ------------------------------------------------------------------------------------------------
    def run(self, plan: Plan, outputs: list[str], cancel: CancelToken | None = None) -> tuple[dict[str, Any], RunReport]:
        report = RunReport()
        t0 = time.perf_counter()
        self.bus.emit("run_started", None, outputs=list(outputs))
        cached, to_run, wanted = self.resolve(plan, outputs, report)
        order = [sid for sid in plan.steps if sid in to_run]
        state = RunState(
            waiting={sid: len(plan.steps[sid].upstream() & to_run) for sid in order},
            dependents={sid: set() for sid in order},
            remaining_uses={},
            ready=deque(),
        )
        for sid in order:
            for up in plan.steps[sid].upstream():
                if up in to_run:
                    state.dependents[up].add(sid)
                state.remaining_uses[up] = state.remaining_uses.get(up, 0) + 1
        output_steps = {s.step for n in outputs if isinstance(s := plan.outputs[n], Ref)}
        state.values.update(cached)
        state.ready.extend(sid for sid in order if state.waiting[sid] == 0)
        done_q: queue.Queue = queue.Queue()
        pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="nodegraph") if self.max_workers > 1 else None
        submit: Submit = (lambda fn: pool.submit(fn)) if pool else synchronous_submit
        try:
            self._loop(plan, state, submit, done_q, wanted, cancel, report, output_steps)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        report.total_seconds = time.perf_counter() - t0
        if state.failure is not None:
            self.bus.emit("run_finished", None, ok=False)
            raise state.failure
        values = {name: self._value(src, state.values) for name, src in plan.outputs.items() if name in outputs}
        self.bus.emit("run_finished", None, ok=True, seconds=report.total_seconds)
        return values, report

    @staticmethod
    def _value(src: Any, values: dict[str, dict[str, Any]]) -> Any:
        if isinstance(src, Const):
            return src.value
        if isinstance(src, Ref):
            return values[src.step][src.output]
        raise ValueError(f"graph output refers to a loop-body input {src}")

    def _loop(self, plan: Plan, state: RunState, submit: Submit, done_q: queue.Queue, wanted: dict[str, set[str]],
              cancel: CancelToken | None, report: RunReport, output_steps: set[str]) -> None:
        """The scheduling loop (see the module docstring for the policy)."""
        while state.ready or state.running:
            if cancel is not None and cancel.cancelled and state.failure is None:
                state.failure = Cancelled("run cancelled")
                self.bus.emit("cancelled", None)
            while state.failure is None and state.ready and len(state.running) < self.max_workers:
                sid = state.ready.popleft()
                state.running.add(sid)
                inputs = self._inputs(plan.steps[sid], state.values)
                self.bus.emit("started", sid, type=plan.steps[sid].type)
                submit(lambda s=sid, i=inputs: done_q.put(self._execute(plan.steps[s], i, wanted[s], cancel)))
            if not state.running:
                break
            sid, outputs, error, seconds = done_q.get()
            state.running.discard(sid)
            step = plan.steps[sid]
            if error is not None:
                if state.failure is None:
                    state.failure = error
                self.bus.emit("failed", sid, error=str(error))
                continue
            self._store(step, outputs)
            state.values[sid] = outputs
            report.executed.append(sid)
            report.seconds[sid] = seconds
            self.bus.emit("finished", sid, seconds=seconds)
            for dep in state.dependents[sid]:
                state.waiting[dep] -= 1
                if state.waiting[dep] == 0:
                    state.ready.append(dep)
            for up in step.upstream():
                state.remaining_uses[up] -= 1
                if state.remaining_uses[up] == 0 and up not in output_steps:
                    state.values.pop(up, None)
        state.ready.clear()

    def _inputs(self, step: Step, values: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for name, src in step.inputs.items():
            if isinstance(src, Const):
                out[name] = src.value
            elif isinstance(src, Ref):
                out[name] = values[src.step][src.output]
            elif isinstance(src, Arg):  # pragma: no cover - validation forbids this at top level
                raise ValueError(f"{step.id}.{name} refers to a subgraph input outside a subgraph")
        return out

    def _store(self, step: Step, outputs: dict[str, Any]) -> None:
        for value in outputs.values():
            if isinstance(value, torch.nn.Module):
                self.residency.register(value, on_drop=lambda k=step.key: self.cache.evict(k))
        if step.defn is not None and not step.defn.cache and step.defn.fingerprint is None:
            return  # impure and unfingerprinted: its key is never looked up again, so caching it only leaks
        self.cache.put(step.key, outputs, rewrite=True)  # it ran, so any disk entry was missing or damaged

    # -- one step -----------------------------------------------------------------------------------------
    def _execute(self, step: Step, inputs: dict[str, Any], wanted: set[str], cancel: CancelToken | None):
        t0 = time.perf_counter()
        pinned: list[torch.nn.Module] = []
        try:
            device = self.device_for(step.device)
            ctx = self.context(step, cancel, device)
            inputs = {k: move_to(v, device) for k, v in inputs.items()}
            for value in inputs.values():
                for module in modules_in(value):
                    self.residency.acquire(module, device)
                    self.residency.pin(module)
                    pinned.append(module)
            with grad_mode(step.grad):
                if step.grad:
                    inputs = {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v)
                              for k, v in inputs.items()}
                outputs = self.run_step(step, inputs, wanted, ctx)
            return step.id, outputs, None, time.perf_counter() - t0
        except Cancelled as exc:
            return step.id, None, exc, time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - every node failure becomes a structured error
            summary = {k: summarize(v) for k, v in inputs.items()}
            if isinstance(exc, NodeExecutionError):
                return step.id, None, exc, time.perf_counter() - t0
            err = NodeExecutionError(step.id, step.type, exc, summary)
            err.__cause__ = exc
            return step.id, None, err, time.perf_counter() - t0
        finally:
            for module in pinned:
                self.residency.unpin(module)

    def run_step(self, step: Step, inputs: dict[str, Any], wanted: set[str], ctx: Context) -> dict[str, Any]:
        if step.is_loop:
            return run_loop(step, inputs, wanted, ctx, self._nested, lambda s: self.context(s, ctx._cancel),
                            self.device_for)
        return step.defn.call(inputs, ctx)

    def _nested(self, step: Step, inputs: dict[str, Any], wanted: set[str], ctx: Context) -> dict[str, Any]:
        try:
            return self.run_step(step, inputs, wanted, ctx)
        except (Cancelled, NodeExecutionError):
            raise
        except Exception as exc:  # noqa: BLE001 - name the innermost node that failed
            raise NodeExecutionError(step.id, step.type, exc, {k: summarize(v) for k, v in inputs.items()}) from exc
