"""The ``comfy`` pack: ComfyUI's workflow files as graphs this engine runs.

It registers a graph reader (:meth:`nodegraph.registry.Registry.add_reader`), so ``nodegraph run``, ``validate``
and ``Engine.run`` accept ComfyUI's three forms directly, detected from their content: a UI workflow, an API
prompt, or a PNG ComfyUI saved (its ``prompt`` text chunk is what ran; its ``workflow`` chunk is used when there
is no prompt). The engine knows nothing of ComfyUI: everything is in this pack, registered through the same
entry point as any third-party pack.
"""

from __future__ import annotations

from typing import Any

from nodegraph.errors import GraphValidationError, Issue
from nodegraph.registry import GraphReader

from . import importer, workflow


def detect(doc: Any) -> bool:
    return workflow.detect(doc) in ("ui", "api", "png")


def to_api(doc: Any) -> dict[str, Any]:
    """The API prompt of any of the three forms (a UI workflow converted as ComfyUI's frontend converts it)."""
    kind = workflow.detect(doc)
    if kind == "png":
        chunks = _png(doc)
        if isinstance(chunks.get("prompt"), dict):
            return chunks["prompt"]
        doc, kind = chunks.get("workflow"), "ui"
    if kind == "api":
        return doc
    if kind != "ui":
        raise GraphValidationError([Issue("bad_graph", "not a ComfyUI workflow, prompt or PNG")])
    unknown = [Issue("unknown_type", f"ComfyUI node type {n.get('type')!r} is not supported", str(n.get("id")),
                     None, importer._hint(n.get("type")))
               for n in doc.get("nodes", []) if isinstance(n, dict) and n.get("type") not in importer.TYPES
               and n.get("type") not in workflow.VIRTUAL_NODE_TYPES and n.get("mode") not in (workflow.MODE_NEVER,)
               and not _is_subgraph(doc, n.get("type"))]
    if unknown:
        raise GraphValidationError(unknown)
    try:
        prompt, issues = workflow.ui_to_api(doc, importer.widget_names)
    except workflow.WorkflowError as exc:
        raise GraphValidationError([_issue(i) for i in exc.issues]) from None
    if issues:
        raise GraphValidationError([_issue(i) for i in issues])
    return prompt


def _png(data: bytes) -> dict[str, Any]:
    try:
        return workflow.read_png(data)
    except workflow.WorkflowError as exc:
        raise GraphValidationError([_issue(i) for i in exc.issues]) from None


def _is_subgraph(doc: dict, type_id: Any) -> bool:
    subgraphs = ((doc.get("definitions") or {}).get("subgraphs")) or []
    return any(isinstance(s, dict) and s.get("id") == type_id for s in subgraphs)


def _issue(i: Any) -> Issue:
    return Issue(i.code, i.message, None if i.node is None else str(i.node), i.port)


def convert(doc: Any, registry: Any = None) -> dict[str, Any]:
    return importer.api_to_graph(to_api(doc))


READER = GraphReader("comfy", detect, convert, {"api": to_api})


def register(registry, pack: str = "comfy") -> None:
    registry.add_reader(READER)
