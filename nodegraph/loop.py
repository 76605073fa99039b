"""The loop construct: run a planned body once per element of a sequence (or ``count`` times) with carried state.

A loop node in a graph::

    "sampler": {
      "type": "loop",
      "inputs": {"over": {"node": "sched", "output": "sigmas"}, "pairs": true,
                 "x": {"node": "noise", "output": "out"}, "model": {"node": "load", "output": "denoiser"}},
      "body": {
        "inputs": {"x": {"type": "Latent", "carry": true}, "model": {"type": "Denoiser"}},
        "nodes": {"step": {"type": "sample.euler_step", "inputs": {"x": {"input": "x"}, "sigma": {"input": "item"},
                                                                   "sigma_next": {"input": "next_item"}, ...}}},
        "outputs": {"x": {"node": "step", "output": "x"}, "denoised": {"node": "step", "output": "denoised"}}
      }
    }

Options: ``over`` a sequence (tensor along dim 0, or list) or ``count`` an int — either literal or linked;
``pairs`` (literal) iterates over consecutive pairs (``item``, ``next_item``: ``len - 1`` iterations, what a
sampler needs for sigma and sigma_next); ``grad`` (literal) runs the body with autograd (also implied when a
body node declares ``grad=True``).

The body sees its declared inputs plus implicit ``index`` and ``total``, ``item`` when looping ``over`` a
sequence, and ``next_item`` when ``pairs`` is true (validation rejects a body that uses one it will not get).
Stacked per-iteration outputs are typed ``Tensor`` (one more leading dimension than the body output). A declared
input with ``"carry": true`` is state: its initial value comes from the loop's input of that name (or its
default, e.g. ``null`` for a sampler history) and each iteration's body output of the same name becomes the
next value. The loop's outputs are the final carried values, plus every other body output stacked over the
iterations (``torch.stack`` when all are same-shaped tensors, else a list) — collected only when something
downstream consumes it.

Policy: the body is planned once per loop execution (:func:`compile_body`) — sources resolved to direct
lookups, unused body nodes pruned, per-node contexts built — so an iteration costs little more than the node
calls themselves. Body nodes are not cached individually; the loop node is cached as a whole, under a key
that covers its body by the same rules as top-level nodes: a body node's fingerprint (a file it reads) joins
the key, and a body node that must always run (``cache=False`` without a fingerprint) makes the whole loop
always run (:mod:`nodegraph.plan`). The cancel token (caller, interrupt, deadline) is checked before every
iteration, and a ``progress`` event is emitted after each. A loop longer than the engine's
``max_loop_iterations`` fails before its first iteration.

The loop gets what it needs from its executor as one small :class:`LoopRuntime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .devices import move_to, same_device
from .errors import Cancelled, NodeExecutionError, summarize
from .limits import LimitExceeded, Limits
from .node import Context
from .plan import Arg, Body, Const, Ref, Source, Step

_CONST, _ARG, _REF = 0, 1, 2


@dataclass(frozen=True)
class LoopRuntime:
    """What a running loop needs from the executor that runs it."""

    run_nested: Callable[[Step, dict[str, Any], set[str], Context], dict[str, Any]]  # a nested loop step
    context: Callable[[Step], Context]  # a body step's context (same run, cancel token, roots, limits)
    device: Callable[[str | None], torch.device]  # a device pin -> torch.device
    emit: Callable[..., None] | None  # the run's event emitter (progress after each iteration)
    limits: Limits


@dataclass
class _Compiled:
    step: Step
    sources: list[tuple[str, int, Any, Any]]
    ctx: Context | None
    device: torch.device | None  # set only when it differs from the loop's device
    call: Callable[[dict[str, Any], Context | None], dict[str, Any]] | None = None  # None for nested loops


def _encode(src: Source) -> tuple[int, Any, Any]:
    if isinstance(src, Const):
        return _CONST, src.value, None
    if isinstance(src, Arg):
        return _ARG, src.name, None
    return _REF, src.step, src.output


def compile_body(body: Body, wanted: set[str], make_ctx: Callable[[Step], Context],
                 loop_device: torch.device, resolve_device: Callable[[str | None], torch.device]) -> list[_Compiled]:
    """Plan a body once: keep the steps the wanted outputs need, resolve sources, build contexts."""
    needed: set[str] = set()
    todo = [s.step for n in wanted if isinstance(s := body.outputs.get(n), Ref)]
    by_id = {s.id: s for s in body.steps}
    while todo:
        sid = todo.pop()
        if sid not in needed:
            needed.add(sid)
            todo.extend(by_id[sid].upstream())
    compiled = []
    for step in body.steps:
        if step.id not in needed:
            continue
        dev = resolve_device(step.device) if step.device else loop_device
        sources = [(name, *_encode(src)) for name, src in step.inputs.items()]
        ctx = make_ctx(step) if (step.defn is not None and step.defn.ctx_param) or step.is_loop else None
        call = None if step.is_loop else step.defn.fast_call()
        compiled.append(_Compiled(step, sources, ctx, None if same_device(dev, loop_device) else dev, call))
    return compiled


def stack(values: list[Any]) -> Any:
    if values and all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            return torch.stack(values)
    return values


def _sequence(over: Any) -> Any:
    if isinstance(over, torch.Tensor):
        if over.dim() == 0:
            raise ValueError("loop 'over' must be a sequence, got a 0-d tensor")
        return over
    if isinstance(over, (list, tuple)):
        return over
    raise TypeError(f"loop 'over' must be a tensor or a list, got {type(over).__name__}")


def run_loop(step: Step, inputs: dict[str, Any], wanted: set[str], ctx: Context, runtime: LoopRuntime) -> dict[str, Any]:
    """Execute a loop step. ``inputs`` holds the resolved loop inputs (options may be linked values)."""
    body = step.body
    options = {**step.loop_options, **{k: inputs[k] for k in ("over", "count", "pairs", "grad") if k in inputs}}
    pairs = bool(options.get("pairs", False))
    seq = _sequence(options["over"]) if options.get("over") is not None else None
    if seq is not None:
        total = max(len(seq) - (1 if pairs else 0), 0)
    else:
        total = int(options.get("count", 0))
        if total < 0:
            raise ValueError(f"loop count must be >= 0, got {total}")
    if total > runtime.limits.max_loop_iterations:
        raise LimitExceeded(f"the loop would run {total:,} iterations, over the limit of "
                            f"{runtime.limits.max_loop_iterations:,} (max_loop_iterations)", "max_loop_iterations")
    args: dict[str, Any] = {name: inputs.get(name) for name in body.declared}
    if body.grad:
        # Tensors made under inference_mode cannot enter autograd; clone them once, here.
        args = {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v) for k, v in args.items()}
    carried = list(body.carried)
    stacked = sorted(n for n in wanted if n not in body.carried and n in body.outputs)
    out_wanted = set(carried) | set(stacked)
    compiled = compile_body(body, out_wanted, runtime.context, ctx.device, runtime.device)
    out_sources = {n: _encode(body.outputs[n]) for n in out_wanted}
    collected: dict[str, list[Any]] = {n: [] for n in stacked}
    args["total"] = total
    values: dict[str, dict[str, Any]] = {}
    emit, run_nested = runtime.emit, runtime.run_nested
    for i in range(total):
        ctx.check_cancelled()
        args["index"] = i
        if seq is not None:
            args["item"] = seq[i]
            if pairs:
                args["next_item"] = seq[i + 1]
        for c in compiled:
            kwargs = {}
            for name, kind, a, b in c.sources:
                kwargs[name] = a if kind == _CONST else args[a] if kind == _ARG else values[a][b]
            if c.device is not None:
                kwargs = {k: move_to(v, c.device) for k, v in kwargs.items()}
            try:
                if c.call is not None:
                    values[c.step.id] = c.call(kwargs, c.ctx)
                else:
                    values[c.step.id] = run_nested(c.step, kwargs, set(c.step.outputs), c.ctx)
            except (Cancelled, NodeExecutionError):
                raise
            except Exception as exc:  # noqa: BLE001 - name the body node, not just the loop
                summary = {k: summarize(v) for k, v in kwargs.items()}
                raise NodeExecutionError(c.step.id, c.step.type, exc, summary) from exc
        nxt = {n: (a if k == _CONST else args[a] if k == _ARG else values[a][b]) for n, (k, a, b) in out_sources.items()}
        for n in carried:
            args[n] = nxt[n]
        for n in stacked:
            collected[n].append(nxt[n])
        if emit is not None:
            emit("progress", ctx.node_id, done=i + 1, total=total, message="")
    result = {n: args[n] for n in carried}
    result.update({n: stack(v) for n, v in collected.items()})
    return result
