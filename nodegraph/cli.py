"""The ``nodegraph`` command line.

    nodegraph run GRAPH [--set NODE.INPUT=VALUE]... [--out DIR] [--cache-dir DIR] [--cache-size SIZE]
                        [--device auto|cpu|cuda|cuda:N] [--output NAME]... [--plugins DIR]... [--input-root DIR]
                        [--models DIR]... [--timeout SECONDS] [--json]
    nodegraph validate GRAPH [--set ...] [--json]
    nodegraph nodes [--json]
    nodegraph schema

Exit codes: 0 ok; 2 invalid graph, unreadable JSON or bad ``--set`` (nothing executed); 1 failure while running.
With ``--json`` stdout holds exactly one JSON object; progress goes to stderr, as bars when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import Cancelled, GraphValidationError, Issue, NodeExecutionError
from .events import Event

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class ProgressPrinter:
    """Turns events into progress bars on a terminal (stderr; tqdm draws them), or nothing otherwise."""

    def __init__(self, stream=sys.stderr, enabled: bool | None = None):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.kind == "progress" and event.data.get("total"):
            bar = self._bars.get(event.node)
            if bar is None:
                bar = self._bars[event.node] = tqdm(total=event.data["total"], desc=event.node, file=self.stream,
                                                    leave=True, dynamic_ncols=True, mininterval=0.05)
            bar.update(event.data["done"] - bar.n)
        elif event.kind in ("started", "cached", "failed"):
            verb = {"started": "running", "cached": "cached ", "failed": "failed "}[event.kind]
            tqdm.write(f"{verb} {event.node}", file=self.stream)
        if event.kind in ("finished", "failed", "run_finished"):
            for node in [event.node] if event.kind != "run_finished" else list(self._bars):
                bar = self._bars.pop(node, None)
                if bar is not None:
                    bar.close()


def _parse_sets(items: Sequence[str]) -> tuple[dict[str, Any], list[Issue]]:
    from .validate import parse_set

    overrides: dict[str, Any] = {}
    issues: list[Issue] = []
    for item in items:
        try:
            node, name, value = parse_set(item)
        except ValueError as exc:
            issues.append(Issue("bad_override", str(exc)))
            continue
        overrides[f"{node}.{name}"] = value
    return overrides, issues


def _print_invalid(issues: list[Issue], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "errors": [i.to_json() for i in issues]}))
    else:
        print(f"invalid graph: {len(issues)} problem(s)", file=sys.stderr)
        for issue in issues:
            print(f"  {issue}", file=sys.stderr)
    return EXIT_INVALID


def _engine(args: argparse.Namespace):
    from .engine import Engine

    input_root = args.input_root
    if input_root is None:  # by default a graph reads its input files from its own folder
        graph = Path(args.graph)
        input_root = graph.parent if graph.suffix in (".json", ".msgpack", ".png") else Path(".")
    from .limits import DEFAULT_LIMITS

    limits = DEFAULT_LIMITS.with_(deadline_s=args.timeout) if getattr(args, "timeout", None) else DEFAULT_LIMITS
    return Engine(device=args.device, cache_dir=args.cache_dir, plugin_dirs=args.plugins,
                  input_root=input_root, output_root=args.out, model_roots=args.models, limits=limits,
                  disk_budget=_size(args.cache_size))


def _size(text: str | None) -> int | None:
    """``"10G"``, ``"500M"``, ``"123456"`` -> bytes; None stays None."""
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    return int(float(number) * factor)


def cmd_validate(args: argparse.Namespace) -> int:
    overrides, issues = _parse_sets(args.set)
    try:
        engine = _engine(args)
    except RuntimeError as exc:
        return _print_invalid(issues + [Issue("bad_device", str(exc))], args.json)
    result = engine.validate(args.graph, overrides)
    issues = issues + result.issues
    if issues:
        return _print_invalid(issues, args.json)
    if args.json:
        print(json.dumps({"ok": True, "errors": []}))
    else:
        print(f"ok: {args.graph}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .outputs import write_outputs

    overrides, issues = _parse_sets(args.set)
    if issues:
        return _print_invalid(issues, args.json)
    try:
        engine = _engine(args)
    except RuntimeError as exc:
        return _print_invalid([Issue("bad_device", str(exc))], args.json)
    printer = ProgressPrinter()
    watchdog = _watchdog(args.timeout, args.json) if args.timeout else None
    try:
        result = engine.run(args.graph, overrides, outputs=args.output or None, on_event=printer)
    except GraphValidationError as exc:
        return _print_invalid(exc.issues, args.json)
    except (NodeExecutionError, Cancelled) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": exc.to_json()}))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if watchdog is not None:
            watchdog.cancel()
    graph_json = result.graph.to_json(separators=(",", ":"))
    try:
        files = write_outputs(result.outputs, result.output_types, args.out, graph_json)
    except (OSError, ValueError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": "output_failed", "message": str(exc)}}))
        print(f"error: cannot write outputs to {args.out!r}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report = result.report.to_json()
    for warning in result.report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"outputs": files, **report}))
    else:
        for name, paths in files.items():
            print(f"{name}: {', '.join(paths) if paths else '(not a file value)'}")
        print(f"executed {len(report['executed'])}, cached {len(report['cached'])}, "
              f"{report['seconds']['total']:.2f} s", file=sys.stderr)
    return EXIT_OK


def _watchdog(timeout: float, as_json: bool) -> Any:
    """The deadline is checked between steps, iterations and progress reports; a node that never reaches one
    (one long library call) is stopped here, 10 s past the deadline, by ending the process."""
    import os
    import threading

    def fire() -> None:
        message = f"the run's deadline of {timeout:g} s passed and a node did not stop; the process was ended"
        if as_json:
            print(json.dumps({"ok": False, "error": {"code": "deadline", "message": message}}), flush=True)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)

    timer = threading.Timer(timeout + 10.0, fire)
    timer.daemon = True
    timer.start()
    return timer


def nodes_markdown(defs: list) -> str:
    """A Markdown reference of node types, grouped by category (``nodegraph nodes --markdown``)."""
    lines = ["# Node reference", "",
             "Generated by `nodegraph nodes --markdown --pack builtin > docs/nodes.md`; do not edit by hand.", ""]
    by_cat: dict[str, list] = {}
    for d in defs:
        by_cat.setdefault(d.category, []).append(d)
    for cat in sorted(by_cat):
        lines += [f"## {cat}", ""]
        for d in by_cat[cat]:
            kind = " (graph-defined: its subgraph is in `nodegraph nodes --json`)" if d.kind == "graph" else ""
            grad = " Runs with gradients." if d.grad else ""
            lines += [f"### `{d.type_id}` {d.version}", "", f"{d.description}{grad}{kind}", ""]
            if d.inputs:
                lines += ["| input | type | default | notes |", "| --- | --- | --- | --- |"]
                for name, i in d.inputs.items():
                    default = "required" if i.required else f"`{json.dumps(i.default)}`" if _jsonable(i.default) else "—"
                    notes = _input_notes(i)
                    lines.append(f"| `{name}` | {i.type} | {default} | {notes} |")
                lines.append("")
            outs = ", ".join(f"`{n}`: {t}" for n, t in d.outputs.items())
            lines += [f"Outputs: {outs}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _input_notes(idef: Any) -> str:
    parts = []
    if idef.type.choices is not None:
        parts.append("one of " + ", ".join(f"`{c}`" for c in idef.type.choices))
    schema = idef.json_schema().get("schema", {})
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{sym} {schema[key]}")
    if idef.description:
        parts.append(idef.description)
    if idef.link_only:
        parts.append("link only")
    return "; ".join(parts).replace("|", "\\|")


def cmd_nodes(args: argparse.Namespace) -> int:
    from .engine import Engine

    registry = Engine(device="cpu", plugin_dirs=args.plugins).registry
    defs = [d for d in registry if args.pack is None or d.pack == args.pack]
    if args.markdown:
        sys.stdout.write(nodes_markdown(defs))
        return EXIT_OK
    if args.json:
        print(json.dumps({
            "nodes": [d.schema() for d in defs],
            "failures": [f.to_json() for f in registry.failures],
        }))
    else:
        by_cat: dict[str, list] = {}
        for d in defs:
            by_cat.setdefault(d.category, []).append(d)
        for cat in sorted(by_cat):
            print(f"[{cat}]")
            for d in by_cat[cat]:
                ins = ", ".join(f"{n}: {i.type}" + ("" if i.required else "?") for n, i in d.inputs.items())
                outs = ", ".join(f"{n}: {t}" for n, t in d.outputs.items())
                print(f"  {d.type_id} {d.version}  ({ins}) -> ({outs})  [{d.pack}]")
        for f in registry.failures:
            print(f"FAILED pack {f.pack} ({f.source}): {f.error}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from .graph import graph_json_schema

    print(json.dumps(graph_json_schema(), indent=2))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    """Convert another program's graph file (a pack's reader) to this engine's graph JSON, or to a named
    intermediate form (``--api``: ComfyUI's API prompt)."""
    from .errors import GraphValidationError
    from .limits import DEFAULT_LIMITS
    from .source import PNG_SIGNATURE, decode_json, read_graph_file

    from .engine import Engine

    registry = Engine(device="cpu", plugin_dirs=args.plugins).registry
    reader = next((r for r in registry.readers if r.name == args.format), None)
    if reader is None:
        names = ", ".join(r.name for r in registry.readers) or "none"
        return _print_invalid([Issue("unknown_format", f"no graph reader {args.format!r}", hint=f"readers: {names}")],
                              args.json)
    try:
        data = read_graph_file(Path(args.file), DEFAULT_LIMITS)
        doc: Any = data
        if data[:8] != PNG_SIGNATURE:
            doc, issues = decode_json(data.decode("utf-8-sig", errors="replace"), DEFAULT_LIMITS)
            if doc is None or issues:
                raise GraphValidationError(issues or [Issue("bad_json", "not JSON")])
        if not reader.detect(doc):
            raise GraphValidationError([Issue("bad_graph", f"{args.file} is not a {args.format} file")])
        if args.api:
            stage = reader.stages.get("api")
            if stage is None:
                raise GraphValidationError([Issue("bad_graph", f"the {args.format} reader has no API form")])
            result = stage(doc)
        else:
            result = reader.convert(doc, registry)
    except GraphValidationError as exc:
        return _print_invalid(list(exc.issues), args.json)
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodegraph", description="Run generative-model pipelines written as JSON graphs.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--plugins", action="append", default=[], metavar="DIR", help="extra node-pack folder")

    for name in ("run", "validate"):
        sp = sub.add_parser(name, help=f"{name} a graph")
        sp.add_argument("graph", help="graph file (.json or .msgpack)")
        sp.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override a literal input (VALUE is JSON, or a plain string)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--device", default="auto", help="default device: auto, cpu, cuda, cuda:N")
        sp.add_argument("--cache-dir", default=None, help="disk cache folder (reused across runs)")
        sp.add_argument("--out", default="out", help="output folder (file outputs go here)")
        sp.add_argument("--input-root", default=None,
                        help="folder that file-reading nodes are confined to (default: the graph file's folder)")
        sp.add_argument("--output", action="append", default=[], metavar="NAME", help="only compute this output")
        sp.add_argument("--models", action="append", default=[], metavar="DIR",
                        help="a model root in ComfyUI's layout (checkpoints/, loras/, vae/, ...); repeatable; "
                             "also NODEGRAPH_MODELS")
        sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="cancel the run after this many seconds (exit 1, code 'deadline')")
        sp.add_argument("--cache-size", default=None, metavar="SIZE",
                        help="disk cache budget, e.g. 20G; least recently used entries are removed beyond it")
        common(sp)
        sp.set_defaults(fn=cmd_run if name == "run" else cmd_validate)
    sp = sub.add_parser("nodes", help="list node types")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--markdown", action="store_true", help="print a Markdown reference (docs/nodes.md)")
    sp.add_argument("--pack", default=None, help="only node types of this pack")
    common(sp)
    sp.set_defaults(fn=cmd_nodes)
    sp = sub.add_parser("import", help="convert another program's graph file (e.g. a ComfyUI workflow)")
    sp.add_argument("format", help="the reader, e.g. comfy")
    sp.add_argument("file", help="the file (ComfyUI: UI workflow JSON, API prompt JSON or a PNG)")
    sp.add_argument("-o", dest="output", default=None, metavar="OUT", help="write here instead of stdout")
    sp.add_argument("--api", action="store_true", help="print the intermediate API prompt instead (ComfyUI)")
    sp.add_argument("--json", action="store_true", help="errors as one JSON object on stdout")
    common(sp)
    sp.set_defaults(fn=cmd_import)
    sp = sub.add_parser("schema", help="print the graph JSON Schema")
    sp.set_defaults(fn=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "out"):
        args.out = str(Path(args.out))
    try:
        return args.fn(args)
    except BrokenPipeError:  # e.g. `nodegraph schema | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
