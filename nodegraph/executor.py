"""The local executor: small functions over an explicit run state, one loop, an injected submit function.

Policy
------
1. **Resolve.** Walk back from the requested outputs. A step whose key is in the cache (memory, then disk) is
   *cached*: its value is taken and its ancestors are not visited. Every other visited step must *run*.
2. **Schedule.** Steps whose inputs are all available are *ready*. The main loop hands ready steps to
   ``submit`` (at most ``max_workers`` in flight), then blocks on the completion queue. Independent branches
   therefore run concurrently with the threaded submit; a step that is the only one runnable runs inline on the
   calling thread (torch's intra-op threads run slower from a pool worker, and a lone step gains nothing from the
   pool); the synchronous submit runs every step inline (the easy one to debug); a remote executor would submit
   to workers and report on the same queue.
3. **Finish.** A finished step's outputs go to the cache at once (so a later failure or cancellation keeps
   them: the rerun resumes) and its dependents' wait counts drop. A value no remaining step needs is released
   from the run state (the cache may still hold it, within its budget).
4. **Fail / cancel.** On the first failure or on cancellation nothing new is submitted; steps in flight finish
   (and are cached); then :class:`NodeExecutionError` / :class:`Cancelled` is raised. Cancellation is the
   caller's token, an interrupt (``KeyboardInterrupt`` in a node or in the waiting thread) or the run's deadline
   (:class:`nodegraph.events.RunToken`). A node's ``SystemExit`` (a plugin calling ``sys.exit()``) and any other
   ``BaseException`` is that node's failure: it never escapes into the host application or stalls the pool.
5. **Guard values.** A node's outputs are checked against its declared port types and the engine's limits before
   they are cached (the producer is blamed, see :mod:`nodegraph.values`); cache hits are checked the same way and
   a mismatch is a miss. A node that changes an input in place fails, and the cache entries the change may have
   reached (the producer's and its descendants' from this run) are dropped.

Each step runs under ``torch.no_grad`` unless it (or its loop body) declares it needs gradients, in which case
it runs with autograd enabled and inference tensors among its inputs are cloned first. (Not ``inference_mode``:
its tensors have no version counter, and the mutation guard needs one; a loop's body does run under
``inference_mode``, for its lower per-op cost — see :func:`grad_mode`.) Tensors are moved to the step's device
at the edge only when they live elsewhere (containers are rebuilt on the way, so a node gets its own copies); models are made resident through the residency manager and pinned
while the step runs.
"""

from __future__ import annotations

import os
import queue
import time
import uuid
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
from .events import CancelToken, EventBus, RunToken
from .limits import DEFAULT_LIMITS, Limits
from .loop import LoopRuntime, run_loop
from .node import Context
from .plan import Arg, Const, Plan, Ref, Step
from .values import changed, check_output, detach_inference, matches, tensor_versions, tensors_in

Submit = Callable[[Callable[[], None]], None]


@dataclass
class RunReport:
    """What a run did: which steps executed, which came from the cache, how long each took, what to look at."""

    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    run_id: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"executed": [...], "cached": [...], "seconds": {"total": s, "nodes": {id: s}}}``, plus
        ``"warnings": [...]`` when there are any (the CLI's ``--json`` contract)."""
        out: dict[str, Any] = {
            "executed": list(self.executed),
            "cached": list(self.cached),
            "seconds": {"total": round(self.total_seconds, 6),
                        "nodes": {k: round(v, 6) for k, v in self.seconds.items()}},
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


@dataclass
class RunState:
    """The explicit state record of one run."""

    waiting: dict[str, int]  # step -> number of inputs not yet available
    dependents: dict[str, set[str]]  # step -> steps that consume it and must run
    remaining_uses: dict[str, int]  # step -> consumers that have not finished yet
    ready: deque[str]
    token: RunToken
    emit: Callable[..., None]
    run_id: str = ""
    running: set[str] = field(default_factory=set)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: BaseException | None = None
    tainted: set[str] = field(default_factory=set)  # steps whose inputs a node changed in place: never cached


class InputMutated(NodeExecutionError):
    """A node changed one of its input tensors in place (see :mod:`nodegraph.values`)."""

    def __init__(self, step: Step, mutated: list[tuple[str, torch.Tensor]], inputs: dict[str, str]):
        ports = sorted({port for port, _ in mutated})
        sources = [f"{p!r} (from {src.step}.{src.output})" if isinstance(src := step.inputs.get(p), Ref) else repr(p)
                   for p in ports]
        error = RuntimeError(f"the node changed its input {', '.join(sources)} in place; inputs are other nodes' "
                             "cached outputs and must not be modified (copy first, e.g. x = x.clone(), or use the "
                             "out-of-place op)")
        super().__init__(step.id, step.type, error, inputs)
        self.ports, self.tensors = ports, [t for _, t in mutated]


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
def _autograd() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextmanager
def _no_grad() -> Iterator[None]:
    """``torch.no_grad()`` without building its object per step (this runs once per node)."""
    before = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        yield
    finally:
        torch._C._set_grad_enabled(before)


def grad_mode(step: Step) -> Any:
    """A step's autograd mode: enabled when it needs gradients; else ``no_grad``, or ``inference_mode`` for a
    loop body (lower per-op cost; the loop's own inputs keep their version counters, its outputs are cloned
    when stored)."""
    if step.grad:
        return _autograd()
    return torch.inference_mode() if step.is_loop else _no_grad()


class LocalExecutor:
    """Runs plans in this process, on a thread pool (``max_workers > 1``) or inline (``max_workers == 1``)."""

    def __init__(self, cache: Cache, residency: ResidencyManager, bus: EventBus, *, default_device: str = "auto",
                 max_workers: int | None = None, input_root: Path | None = None, output_root: Path | None = None,
                 models: Any = None, limits: Limits = DEFAULT_LIMITS):
        self.models = models
        self.limits = limits
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

    def context(self, step: Step, state: RunState, device: torch.device | None = None) -> Context:
        return Context(step.id, device if device is not None else self.device_for(step.device), emit=state.emit,
                       cancel=state.token, input_root=self.input_root, output_root=self.output_root,
                       residency=self.residency, models=self.models, limits=self.limits, resolved=step.resolved,
                       run_id=state.run_id)

    # -- resolve ------------------------------------------------------------------------------------------
    def resolve(self, plan: Plan, outputs: list[str], report: RunReport,
                emit: Callable[..., None]) -> tuple[dict[str, dict], set[str], dict[str, set[str]]]:
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
            if (value is not MISSING and wanted[sid] <= set(value)
                    and (tier == "memory" or matches(value, step.types, self.limits))):
                cached[sid] = value
                report.cached.append(sid)
                emit("cached", sid, tier=tier)
                continue
            to_run.add(sid)
            todo.extend(step.upstream())
        return cached, to_run, wanted

    # -- run ------------------------------------------------------------------------------------------------
    def run(self, plan: Plan, outputs: list[str], cancel: CancelToken | None = None,
            run_id: str | None = None) -> tuple[dict[str, Any], RunReport]:
        run_id = run_id or uuid.uuid4().hex
        report = RunReport(run_id=run_id)
        emit = self.bus.emitter(run_id)
        token = RunToken(cancel, self.limits.deadline_s)
        t0 = time.perf_counter()
        emit("run_started", None, outputs=list(outputs))
        cached, to_run, wanted = self.resolve(plan, outputs, report, emit)
        order = [sid for sid in plan.steps if sid in to_run]
        state = RunState(
            waiting={sid: len(plan.steps[sid].upstream() & to_run) for sid in order},
            dependents={sid: set() for sid in order},
            remaining_uses={},
            ready=deque(),
            token=token,
            emit=emit,
            run_id=run_id,
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
            self._loop(plan, state, submit, done_q, wanted, report, output_steps)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        report.total_seconds = time.perf_counter() - t0
        if state.failure is not None:
            emit("run_finished", None, ok=False)
            raise state.failure
        values = {name: self._value(src, state.values) for name, src in plan.outputs.items() if name in outputs}
        emit("run_finished", None, ok=True, seconds=report.total_seconds)
        return values, report

    @staticmethod
    def _value(src: Any, values: dict[str, dict[str, Any]]) -> Any:
        if isinstance(src, Const):
            return src.value
        if isinstance(src, Ref):
            return values[src.step][src.output]
        raise ValueError(f"graph output refers to a loop-body input {src}")

    def _loop(self, plan: Plan, state: RunState, submit: Submit, done_q: queue.Queue, wanted: dict[str, set[str]],
              report: RunReport, output_steps: set[str]) -> None:
        """The scheduling loop (see the module docstring for the policy)."""
        emit = state.emit
        while state.ready or state.running:
            self._check_cancel(state)
            while state.failure is None and state.ready and len(state.running) < self.max_workers:
                sid = state.ready.popleft()
                state.running.add(sid)
                inputs = self._inputs(plan.steps[sid], state.values)
                emit("started", sid, type=plan.steps[sid].type)
                # The only runnable step runs on this thread: torch's intra-op threads in a pool worker contend
                # with the caller's OpenMP team (measured 3x slower per U-Net call on 2 cores), and a lone step
                # gains nothing from the pool. Independent steps still run concurrently.
                alone = not state.ready and len(state.running) == 1
                (synchronous_submit if alone else submit)(
                    lambda s=sid, i=inputs: done_q.put(self._execute(plan.steps[s], i, wanted[s], state)))
            if not state.running:
                break
            try:
                sid, outputs, error, seconds = self._wait(done_q, state)
            except KeyboardInterrupt:  # the waiting thread was interrupted: steps in flight stop at their next check
                state.token.cancel("interrupted")
                continue
            state.running.discard(sid)
            step = plan.steps[sid]
            if error is not None:
                if isinstance(error, InputMutated):
                    self._taint(plan, error, state)
                if state.failure is None:
                    state.failure = error
                emit("failed", sid, error=str(error))
                continue
            if sid not in state.tainted:
                self._store(step, outputs)
            state.values[sid] = outputs
            report.executed.append(sid)
            report.seconds[sid] = seconds
            emit("finished", sid, seconds=seconds)
            for dep in state.dependents[sid]:
                state.waiting[dep] -= 1
                if state.waiting[dep] == 0:
                    state.ready.append(dep)
            for up in step.upstream():
                state.remaining_uses[up] -= 1
                if state.remaining_uses[up] == 0 and up not in output_steps:
                    state.values.pop(up, None)
        state.ready.clear()

    def _wait(self, done_q: queue.Queue, state: RunState) -> tuple:
        """The next finished step; wakes up to notice a deadline or a cancel while long steps run."""
        while True:
            try:
                return done_q.get(timeout=0.25)
            except queue.Empty:
                self._check_cancel(state)

    @staticmethod
    def _check_cancel(state: RunState) -> None:
        """Record a cancellation (caller, interrupt, deadline) as the run's failure, once."""
        if state.failure is None and state.token.cancelled:
            state.failure = Cancelled(state.token.message(), state.token.reason or "cancelled")
            state.emit("cancelled", None, reason=state.token.reason)

    def _taint(self, plan: Plan, error: "InputMutated", state: RunState) -> None:
        """A node changed tensors in place: forget every memory entry holding them, and everything downstream
        of those in this plan (from both tiers: a step running beside the change may have read it). Disk
        entries of the holders themselves were written before the change and stay."""
        storages = {t.untyped_storage().data_ptr() for t in error.tensors}
        holders = {key for key, outputs in self.cache.memory.items()
                   if any(t.untyped_storage().data_ptr() in storages for t in tensors_in(outputs, modules_in))}
        for key in holders:
            self.cache.discard(key, disk=False)
        by_key = {step.key: sid for sid, step in plan.steps.items()}
        consumers = plan.consumers()
        todo = [by_key[k] for k in holders if k in by_key] + [error.node]
        seen: set[str] = set()
        while todo:
            sid = todo.pop()
            if sid not in seen:
                seen.add(sid)
                todo.extend(consumers.get(sid, ()))
        state.tainted |= seen
        for sid in seen:
            if plan.steps[sid].key not in holders:
                self.cache.discard(plan.steps[sid].key)

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
        if not step.pure:
            return  # its key is a nonce, never looked up again: caching it would only leak
        self.cache.put(step.key, outputs, rewrite=True)  # it ran, so any disk entry was missing or damaged

    # -- one step -----------------------------------------------------------------------------------------
    def _execute(self, step: Step, inputs: dict[str, Any], wanted: set[str], state: RunState):
        t0 = time.perf_counter()
        pinned: list[torch.nn.Module] = []
        try:
            device = self.device_for(step.device)
            ctx = self.context(step, state, device)
            inputs = {k: move_to(v, device) for k, v in inputs.items()}  # containers arrive as fresh copies
            for value in inputs.values():
                for module in modules_in(value):
                    self.residency.acquire(module, device)
                    self.residency.pin(module)
                    pinned.append(module)
            with grad_mode(step):
                if step.grad:
                    inputs = {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v)
                              for k, v in inputs.items()}
                versions = tensor_versions(inputs, modules_in)
                outputs = self.run_step(step, inputs, wanted, ctx, state)
            mutated = changed(versions)
            if mutated:
                raise InputMutated(step, mutated, {k: summarize(v) for k, v in inputs.items()})
            for name, value in outputs.items():  # a loop's stacked outputs may be lists: only carried ones are typed
                ptype = None if step.is_loop and name not in step.body.carried else step.types.get(name)
                check_output(value, ptype, self.limits, f"{step.id}.{name}")
            return step.id, detach_inference(outputs), None, time.perf_counter() - t0
        except (Cancelled, NodeExecutionError) as exc:
            return step.id, None, exc, time.perf_counter() - t0
        except KeyboardInterrupt:
            state.token.cancel("interrupted")
            return step.id, None, Cancelled(state.token.message(step.id), "interrupted"), time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - every node failure (SystemExit too) becomes a structured error
            if isinstance(exc, SystemExit):
                exc = RuntimeError(f"the node called sys.exit({exc.code!r}); a node must raise an exception instead")
            err = NodeExecutionError(step.id, step.type, exc, {k: summarize(v) for k, v in inputs.items()})
            err.__cause__ = exc
            return step.id, None, err, time.perf_counter() - t0
        finally:
            for module in pinned:
                self.residency.unpin(module)

    def run_step(self, step: Step, inputs: dict[str, Any], wanted: set[str], ctx: Context,
                 state: RunState) -> dict[str, Any]:
        if step.is_loop:
            runtime = LoopRuntime(
                run_nested=lambda s, i, w, c: self._nested(s, i, w, c, state),
                context=lambda s: self.context(s, state),
                device=self.device_for,
                emit=state.emit,
                limits=self.limits,
            )
            return run_loop(step, inputs, wanted, ctx, runtime)
        return step.defn.call(inputs, ctx)

    def _nested(self, step: Step, inputs: dict[str, Any], wanted: set[str], ctx: Context,
                state: RunState) -> dict[str, Any]:
        try:
            return self.run_step(step, inputs, wanted, ctx, state)
        except (Cancelled, NodeExecutionError):
            raise
        except Exception as exc:  # noqa: BLE001 - name the innermost node that failed
            raise NodeExecutionError(step.id, step.type, exc, {k: summarize(v) for k, v in inputs.items()}) from exc
