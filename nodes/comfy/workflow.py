"""Read ComfyUI workflows and convert UI graphs to API prompts, as the ComfyUI web frontend does.

Pure Python (``json``, ``struct``, ``zlib``); no torch, no ComfyUI.

* :func:`detect` tells a UI workflow (``"ui"``), an API prompt (``"api"``) and PNG bytes (``"png"``) apart.
* :func:`read_png` returns the ``prompt`` and ``workflow`` text chunks of a ComfyUI PNG, parsed as JSON.
* :func:`ui_to_api` converts a UI workflow to the prompt the frontend POSTs to ``/prompt``
  (``{id: {"inputs", "class_type", "_meta": {"title", ...}}}``) and returns the problems it found, all of them.

The caller supplies ``widget_names(class_type)``: the node type's *persisted* widgets in order, i.e. the names
that ``widgets_values`` lists positionally: the widget inputs as ``/object_info`` orders them (``input_order``,
required then optional, ``forceInput`` ones excluded) plus the frontend's own widgets where the frontend adds
them (``control_after_generate`` after an INT named ``seed``/``noise_seed`` or any input with the
``control_after_generate`` option; ``control_filter_list`` after it for a COMBO; ``upload`` after the inputs for
a media-upload COMBO). ``None`` means "unknown type": its widget values are then not mapped (the node pack
reports unknown types; the prompt still carries every node's ``class_type``).

Rules, as read in the frontend's TypeScript (package ``comfyui-frontend-package`` 1.58.1, sources from its
sourcemaps; paths relative to the ComfyUI_frontend repository):

Loading (``src/lib/litegraph/src/LGraph.ts`` ``configure``, ``src/lib/litegraph/src/linkDeduplication.ts``)
  * ``version`` 0.4 stores links as arrays ``[id, origin_id, origin_slot, target_id, target_slot, type]``,
    version 1 as objects (plus ``state``); subgraph definitions always use objects. This reader accepts either
    form in any version.
  * The ``links`` list is the truth, not the slots' ``link`` fields. Several links into one input slot: the
    first survives, unless a later one is the one some node input's ``link`` field names and the first is not
    (``normalizeConfiguredTopology``).
  * A link's target slot is re-pointed by name: to the node input whose name is that of the serialized input
    that references the link, unless a link that stays where it is holds that slot (``realignInputLinkSlots``).
  * Node ids are strings (``src/types/nodeId.ts``). Inner node ids of subgraph definitions that collide with a
    root node id or an earlier definition's node id are reminted sequentially from the root's ``last_node_id``
    (v0.4) / ``state.lastNodeId`` (v1), and links and ``proxyWidgets`` references are patched
    (``src/lib/litegraph/src/subgraph/subgraphDeduplication.ts``, ``src/lib/litegraph/src/idAllocation.ts``);
    nested ``definitions.subgraphs`` are flattened; a repeated definition id keeps the first.
  * Widget values are positional: each widget whose ``serialize`` is not false takes the next entry of
    ``widgets_values`` (``LGraphNode.configure``, ``src/stores/widgetValueStore.ts``); ``widgets_values_named``
    is used only with a non-default setting (so only when ``widgets_values`` is absent, here). A dict
    ``widgets_values`` (some custom nodes) is mapped by name here; the frontend leaves it to the extension.
  * Load-time patches in ``src/scripts/app.ts`` (``loadGraphData``): KSampler/KSamplerAdvanced
    ``sampler_name`` values starting with ``sample_`` lose that prefix; a ``control_after_generate`` of
    ``true``/``false`` (old files) reads as ``randomize``/``fixed`` (never sent).

Prompt (``src/utils/executionUtil.ts`` ``graphToPrompt``, ``src/lib/litegraph/src/subgraph/ExecutableNodeDTO.ts``)
  * Virtual nodes (``isVirtualNode``: Reroute ``src/extensions/core/rerouteNode.ts``, PrimitiveNode
    ``src/extensions/core/widgetInputs.ts``, Note and MarkdownNote ``src/extensions/core/noteNode.ts``, subgraph
    instances ``src/lib/litegraph/src/subgraph/SubgraphNode.ts``), muted (mode 2) and bypassed (mode 4) nodes
    are not sent. Groups play no part.
  * Inputs: first every widget in widget order whose ``options.serialize`` is not false (so not
    ``control_after_generate``, ``control_filter_list`` (``src/core/graph/widgets/valueControlWidgets.ts``) nor
    the ``upload`` button (``src/renderer/extensions/vueNodes/widgets/composables/useImageUploadWidget.ts``));
    an array value is wrapped as ``{"__value__": [...]}``. Then every input slot that resolves: a link becomes
    ``[origin_id, origin_slot]`` and replaces a widget value of the same name (a widget converted to an input).
    An input whose link does not resolve is left out; a widget value of that name stays.
  * Resolving a link: from the origin output, muted nodes give nothing; a bypassed node passes on one of its
    inputs (``_getBypassSlotIndex``): with a ``*``/empty target type the input at the output's index (else the
    first), otherwise the input at the output's index if its type connects with both the output's type and the
    target's, else the first input of exactly the target type, else the first that connects with both
    (``LiteGraph.isValidConnection``: ``*``/empty match anything, comma lists match if any member does,
    case-insensitive); beyond a bypassed node the target type is that node's input type. A virtual node
    passes on its input of the same index, keeping the target type (Reroute chains); a virtual node without
    one (PrimitiveNode) gives nothing. A subgraph instance's output continues at the inner node that feeds the
    definition's output; an inner input fed by the definition's input node (id -10) continues at the instance's
    input of that index and, where that is not linked, takes the value of the widget it promotes, if any.
  * Before that, each PrimitiveNode writes its value (``widgets_values[0]``; text replacements when its
    "Run widget replace on values" property is set) into the widget of every input its output links to
    directly (``applyToGraph``, ``src/extensions/core/widgetValuePropagation.ts``); it has that value only if
    its output was linked at load and its first link's target input is a widget input.
  * Node order: the root graph's ``computeExecutionOrder`` (Kahn's algorithm over the node list order, output
    links in ascending id order, loops appended in JS object key order); each subgraph instance that is neither
    muted nor bypassed is followed by its definition's nodes in list order, recursively, ids joined by ``:``
    (``SubgraphNode.getInnerNodes``). A muted or bypassed nested instance is not expanded either: 1.58.1 still
    expands it (only the top level checks the mode), but the frontend repository's later test
    ``src/utils/subgraphBypass.test.ts`` ("contents of inner host B must follow its mode") requires this.
  * Finally inputs that are ``[id, slot]`` pairs naming a node not in the prompt are deleted.
  * ``_meta``: the node's title (the type's display name when the saved title is empty) and, when
    ``properties`` hold valid ones, ``cnr_id``, ``aux_id`` and ``ver`` (``zNodePackMetadata``,
    ``src/platform/workflow/validation/schemas/workflowSchema.ts``).
  * Promoted widgets (``SubgraphNode.ts``): a definition input whose first linked inner input is a widget input
    promotes that widget; the instance's ``widgets_values`` set the promoted values in input order. Legacy
    ``properties.proxyWidgets`` entries ``[inner_id, widget]`` take ``widgets_values`` by entry index as well
    (``src/core/graph/subgraph/migration/proxyWidgetMigration.ts``).
  * Widget ``serializeValue`` hooks: ``filename_prefix`` of the save nodes gets ``%Node.widget%`` and
    ``%date:yyyy-MM-dd%`` replacements (``src/extensions/core/saveImageExtraOutput.ts``,
    ``src/utils/searchAndReplace.ts``); widgets with ``dynamicPrompts`` expand ``{a|b}`` at random and lose
    ``//``/``/* */`` comments (``src/extensions/core/dynamicPrompts.ts``,
    ``packages/shared-frontend-utils/src/formatUtil.ts``) -- only for the widgets the caller names in
    ``dynamic_prompts``, as that flag lives in ``/object_info``.

PNG (``src/scripts/metadata/png.ts``): text chunks ``tEXt``, ``iTXt`` (zlib-compressed or not) and the custom
``comf``, text decoded as UTF-8; the last chunk of a keyword wins; CRCs are not checked. ComfyUI itself writes
``prompt`` and ``workflow`` with PIL's ``add_text``: ``tEXt`` (its JSON is ASCII), ``iTXt`` only for text that
is not Latin-1. This reader also takes ``zTXt``, stops at ``IEND``, tolerates bad CRCs (like the frontend;
``check_crc=True`` refuses them) and refuses text chunks, or their decompressed text, over 16 MiB.

Not reproduced (no node definitions here): the frontend's runtime widget input slots that a saved file leaves
out (they only matter to the bypass slot choice), the pre-1.16 ``forceInput`` dummy widget values
(``migrateWidgetsValues``, ``src/utils/litegraphUtil.ts``; they show as ``bad_widgets``), COMBO values reset to
the first option, ``curve`` widget wrapping, legacy group nodes (``extra.groupNodes``), custom virtual nodes
(pass them in ``virtual_types``), and the "control before generate" setting (values are sent as saved).
"""

from __future__ import annotations

import copy
import json
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable

__all__ = [
    "FRONTEND_ONLY_WIDGETS", "Issue", "MAX_TEXT_CHUNK", "SAVE_NODE_TYPES", "VIRTUAL_NODE_TYPES", "WorkflowError",
    "detect", "process_dynamic_prompt", "read_png", "ui_to_api",
]

MAX_TEXT_CHUNK = 16 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MODE_NEVER = 2  # LGraphEventMode.NEVER: "muted"
MODE_BYPASS = 4  # LGraphEventMode.BYPASS
SUBGRAPH_INPUT_ID = "-10"  # the definition's input node (constants.ts)
SUBGRAPH_OUTPUT_ID = "-20"

#: Persisted widgets that the frontend never sends (``options.serialize === false``).
FRONTEND_ONLY_WIDGETS = frozenset({"control_after_generate", "control_filter_list", "upload"})
#: Node types the core frontend registers as virtual (never sent). Subgraph instances are virtual too.
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
#: Types whose ``filename_prefix`` gets text replacements (saveImageExtraOutput.ts).
SAVE_NODE_TYPES = frozenset({
    "SaveImage", "SaveImageAdvanced", "SaveSVGNode", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio",
    "SaveAudioMP3", "SaveAudioOpus", "SaveAudioAdvanced", "SaveGLB", "Save3DAdvanced", "SaveGaussianSplat",
    "SavePointCloud", "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent",
})
_REPLACE_PROPERTY = "Run widget replace on values"
_SR_PROPERTY = "Node name for S&R"
# Input types the frontend can build a widget for (scripts/widgets.ts ComfyWidgets): a PrimitiveNode may bind
# to an input of such a type even without a "widget" entry.
_WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD", "COLOR",
                           "TEXTAREA", "CURVE", "RANGE"})


@dataclass(frozen=True)
class Issue:
    """One problem: ``code`` (``bad_link``, ``bad_widgets``, ...), the node's prompt id, the port (input name,
    slot index or widget name) and a message."""

    code: str
    node: str | None
    port: str | int | None
    message: str


class WorkflowError(ValueError):
    """A workflow or PNG that cannot be read; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[Issue]):
        self.issues = list(issues)
        super().__init__("; ".join(i.message for i in self.issues) or "invalid workflow")

    @property
    def code(self) -> str | None:
        return self.issues[0].code if self.issues else None


# --------------------------------------------------------------------------------------------------- detect


def _is_ui(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        return False
    links = data.get("links")
    return isinstance(links, list) or (links is None and data.get("version") == 1)


def _is_api(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and isinstance(v.get("class_type"), str) and v["class_type"]
        and isinstance(v.get("inputs"), dict) for v in data.values()))


def detect(data: bytes | str | dict) -> str | None:
    """``"ui"`` (``nodes`` list and ``links``), ``"api"`` (id -> ``{"class_type", "inputs"}``), ``"png"`` (PNG
    signature) or ``None``. Bytes and strings that are not PNG are parsed as UTF-8 JSON."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        if data.startswith(PNG_SIGNATURE):
            return "png"
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if _is_ui(data):
        return "ui"
    if _is_api(data):
        return "api"
    return None


# ------------------------------------------------------------------------------------------------------ PNG


def _inflate(payload: bytes, what: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, MAX_TEXT_CHUNK + 1)
    except zlib.error as e:
        raise WorkflowError([Issue("bad_png", None, what, f"PNG {what}: bad compressed text ({e})")]) from None
    if len(out) > MAX_TEXT_CHUNK or d.unconsumed_tail:
        raise WorkflowError([Issue("too_large", None, what, f"PNG {what}: text over {MAX_TEXT_CHUNK} bytes")])
    return out


def _text_chunk(ctype: bytes, body: bytes) -> tuple[str, str] | None:
    name = ctype.decode("latin-1")
    nul = body.find(b"\0")
    if nul < 0:
        return None  # the frontend scans past the chunk; a keyword without terminator is no text chunk
    keyword = body[:nul].decode("latin-1")
    rest = body[nul + 1:]
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            return None
        rest = _inflate(rest[1:], f"{name} {keyword!r}")
    elif ctype == b"iTXt":
        if len(rest) < 2:
            return None
        compressed, method = rest[0], rest[1]
        rest = rest[2:]
        for _ in range(2):  # language tag, translated keyword
            end = rest.find(b"\0")
            rest = rest[end + 1:] if end >= 0 else b""
        if compressed == 1:
            if method != 0:
                return None  # the frontend skips unknown methods
            rest = _inflate(rest, f"{name} {keyword!r}")
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        text = rest.decode("latin-1")  # tEXt is Latin-1 by the PNG spec; the frontend decodes UTF-8
    return keyword, text


def read_png(data: bytes, *, check_crc: bool = False) -> dict:
    """The ``prompt`` and ``workflow`` chunks of a ComfyUI PNG, parsed: ``{"prompt": ..., "workflow": ...}``
    (only the keys found). Raises :class:`WorkflowError`: ``not_png``, ``bad_png`` (truncated chunk, bad
    compressed text; bad CRC only with ``check_crc``), ``too_large`` (a text chunk or its text over 16 MiB),
    ``bad_json``, ``no_workflow`` (neither chunk)."""
    data = bytes(data)
    if not data.startswith(PNG_SIGNATURE):
        raise WorkflowError([Issue("not_png", None, None, "not a PNG (bad signature)")])
    texts: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise WorkflowError([Issue("bad_png", None, ctype.decode("latin-1"),
                                       f"PNG chunk {ctype!r} at byte {offset} is truncated")])
        if ctype in (b"tEXt", b"zTXt", b"iTXt", b"comf"):
            if length > MAX_TEXT_CHUNK:
                raise WorkflowError([Issue("too_large", None, ctype.decode("latin-1"),
                                           f"PNG {ctype.decode('latin-1')} chunk of {length} bytes "
                                           f"(over {MAX_TEXT_CHUNK})")])
            body = data[offset + 8:offset + 8 + length]
            if check_crc:
                (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
                if zlib.crc32(ctype + body) != crc:
                    raise WorkflowError([Issue("bad_png", None, ctype.decode("latin-1"),
                                               f"PNG chunk {ctype!r} at byte {offset} has a bad CRC")])
            parsed = _text_chunk(ctype, body)
            if parsed:
                texts[parsed[0]] = parsed[1]
        offset = end
        if ctype == b"IEND":
            break
    else:
        if offset < len(data):
            raise WorkflowError([Issue("bad_png", None, None, f"PNG cut inside a chunk header at byte {offset}")])
    out: dict[str, Any] = {}
    issues = []
    for key in ("prompt", "workflow"):
        if key in texts:
            try:
                out[key] = json.loads(texts[key])
            except ValueError as e:
                issues.append(Issue("bad_json", None, key, f"PNG {key!r} text is not JSON ({e})"))
    if issues:
        raise WorkflowError(issues)
    if not out:
        raise WorkflowError([Issue("no_workflow", None, None, "PNG has no 'prompt' or 'workflow' text chunk")])
    return out


# -------------------------------------------------------------------------------------------- graph model


def _key(value: Any) -> str | None:
    """``toNodeId``: ``String(id)``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


@dataclass
class _Slot:
    name: str
    type: Any
    link: int | None = None
    widget: str | None = None


@dataclass
class _Link:
    id: int
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: Any


@dataclass
class _Node:
    key: str
    type: str
    mode: int
    title: str
    raw: dict
    inputs: list[_Slot]  # as saved
    outputs: list[_Slot]
    props: dict
    subgraph: _Graph | None = None  # set for subgraph instances
    names: list[str] | None = None  # persisted widget names
    loaded: dict = field(default_factory=dict)  # widget values as loaded
    values: dict = field(default_factory=dict)  # ... after PrimitiveNodes

    @property
    def runtime_inputs(self) -> list[_Slot]:
        return self.subgraph.sub_inputs if self.subgraph is not None else self.inputs

    @property
    def runtime_outputs(self) -> list[_Slot]:
        return self.subgraph.sub_outputs if self.subgraph is not None else self.outputs


@dataclass
class _Graph:
    id: str | None  # None for the root
    name: str = ""
    nodes: dict[str, _Node] = field(default_factory=dict)
    links: dict[int, _Link] = field(default_factory=dict)
    input_link: dict[tuple[str, int], int] = field(default_factory=dict)
    output_links: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    sub_inputs: list[_Slot] = field(default_factory=list)
    sub_outputs: list[_Slot] = field(default_factory=list)
    sub_input_links: list[list[int]] = field(default_factory=list)
    sub_output_links: list[list[int]] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


def _valid_connection(a: Any, b: Any) -> bool:
    """``LiteGraph.isValidConnection``."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


def _link_fields(raw: Any) -> dict | None:
    if isinstance(raw, (list, tuple)) and len(raw) >= 5:
        return dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), raw))
    if isinstance(raw, dict):
        return raw
    return None


class _Converter:
    def __init__(self, workflow: dict, widget_names: Callable[[str], list[str] | None], *, display_name,
                 dynamic_prompts, rng, now, frontend_only, virtual_types, pack_meta):
        self.wf = workflow
        self.widget_names = widget_names
        self.display_name = display_name
        self.dynamic_prompts = dynamic_prompts
        self.rng = rng
        self.now = now
        self.frontend_only = frozenset(frontend_only)
        self.virtual_types = frozenset(virtual_types)
        self.pack_meta = pack_meta
        self.issues: list[Issue] = []
        self.defs: dict[str, _Graph] = {}
        self.def_raw: dict[str, dict] = {}
        self._names_cache: dict[str, list[str] | None] = {}

    def issue(self, code: str, node: str | None, port: Any, message: str) -> None:
        self.issues.append(Issue(code, node, port, message))

    # ------------------------------------------------------------------------------------------- loading

    def names_for(self, class_type: str) -> list[str] | None:
        if class_type not in self._names_cache:
            names = self.widget_names(class_type)
            self._names_cache[class_type] = None if names is None else list(names)
        return self._names_cache[class_type]

    def load(self) -> _Graph:
        wf = self.wf
        root_nodes = [n for n in wf["nodes"] if isinstance(n, dict)]
        # flatten nested definitions, first definition of an id wins (subgraphDeduplication.ts)
        flat: list[dict] = []

        def flatten(defs: Any) -> None:
            for sg in defs or []:
                if not isinstance(sg, dict) or not isinstance(sg.get("id"), str):
                    continue
                flat.append(sg)
                flatten((sg.get("definitions") or {}).get("subgraphs"))

        flatten((wf.get("definitions") or {}).get("subgraphs"))
        for sg in flat:
            if sg["id"] in self.def_raw:
                if sg != self.def_raw[sg["id"]]:
                    self.issue("bad_subgraph", None, sg["id"],
                               f"subgraph definition {sg['id']} given twice, differently; the first kept")
                continue
            self.def_raw[sg["id"]] = sg
        state = wf.get("state") if isinstance(wf.get("state"), dict) else {}
        last_id = _int(state.get("lastNodeId")) if wf.get("version") != 0.4 else None
        if last_id is None:
            last_id = _int(wf.get("last_node_id")) or 0
        self._last_node_id = max(last_id, 0)
        # the definitions' inner ids that collide with root ids or earlier definitions are reminted first
        # (LGraph.configure normalises the definitions before it adds the root nodes)
        used: set[str] = {k for k in (_key(n.get("id")) for n in root_nodes) if k is not None}
        remaps: dict[str, dict[str, str]] = {}
        for sid, sg in self.def_raw.items():
            remap: dict[str, str] = {}
            local: set[str] = set()
            for n in sg.get("nodes") or []:
                k = _key(n.get("id")) if isinstance(n, dict) else None
                if k is None or k in local:
                    continue  # a repeat inside one definition is dropped, not reminted
                local.add(k)
                if k in used:
                    remap[k] = self._mint(used)
                    used.add(remap[k])
                else:
                    used.add(k)
                    if k.isdigit():
                        self._last_node_id = max(self._last_node_id, int(k))
            remaps[sid] = remap
        # repeated root ids: the second copy gets a fresh id (LGraph.add); links keep naming the first
        seen: set[str] = set()
        root_ids: list[str | None] = []
        for n in root_nodes:
            k = _key(n.get("id"))
            if k is not None and k in seen:
                new = self._mint(used)
                used.add(new)
                self.issue("duplicate_node", new, None, f"node id {k} repeated; the second copy becomes {new}")
                k = new
            if k is not None:
                seen.add(k)
            root_ids.append(k)
        for sid, sg in self.def_raw.items():
            self.defs[sid] = _Graph(sid, name=str(sg.get("name") or ""), raw=sg)
            self._fill_ports(self.defs[sid], sg)
        for sid, sg in self.def_raw.items():
            self._fill_graph(self.defs[sid], sg.get("nodes") or [], sg.get("links") or [], remaps[sid],
                             None, sg)
        root = _Graph(None, raw=wf)
        self._fill_graph(root, root_nodes, wf.get("links") or [], {}, root_ids, None)
        # proxyWidgets references follow the reminted inner ids
        for g in [root, *self.defs.values()]:
            for node in g.nodes.values():
                if node.subgraph is not None and remaps.get(node.type):
                    pw = node.props.get("proxyWidgets")
                    if isinstance(pw, list):
                        for entry in pw:
                            if isinstance(entry, list) and entry and _key(entry[0]) in remaps[node.type]:
                                entry[0] = remaps[node.type][_key(entry[0])]
        for g in [*self.defs.values(), root]:
            for node in g.nodes.values():
                self._load_widgets(node)
        for g in [root, *self.defs.values()]:
            for node in g.nodes.values():
                node.values = dict(node.loaded)
        for g in [root, *self.defs.values()]:
            for node in g.nodes.values():
                if node.type == "PrimitiveNode":
                    self._apply_primitive(g, node, root)
        return root

    def _mint(self, used: set[str]) -> str:
        """``mintNodeId(state, 'sequential', reserved)``."""
        n = self._last_node_id + 1
        while str(n) in used:
            n += 1
        self._last_node_id = n
        return str(n)

    @staticmethod
    def _fill_ports(g: _Graph, sg: dict) -> None:
        for attr, links_attr, key in (("sub_inputs", "sub_input_links", "inputs"),
                                      ("sub_outputs", "sub_output_links", "outputs")):
            for slot in sg.get(key) or []:
                slot = slot if isinstance(slot, dict) else {}
                getattr(g, attr).append(_Slot(str(slot.get("name", "")), slot.get("type")))
                getattr(g, links_attr).append([_int(i) for i in (slot.get("linkIds") or []) if _int(i) is not None])

    def _fill_graph(self, g: _Graph, raw_nodes: list, raw_links: list, remap: dict[str, str],
                    root_ids: list | None, sg: dict | None) -> None:
        where = f"subgraph {g.id}" if g.id else "workflow"
        for index, n in enumerate(raw_nodes):
            if not isinstance(n, dict):
                continue
            k = root_ids[index] if root_ids is not None else _key(n.get("id"))
            if k is None:
                self.issue("bad_node", None, None, f"{where}: a node has no usable id")
                continue
            k = remap.get(k, k)
            if k in g.nodes:
                self.issue("duplicate_node", k, None, f"{where}: node id {k} repeated; first kept")
                continue
            ntype = n.get("type")
            if not isinstance(ntype, str):
                self.issue("bad_node", k, None, f"{where}: node {k} has no type")
                ntype = ""
            inputs = []
            for s in n.get("inputs") or []:
                s = s if isinstance(s, dict) else {}
                w = s.get("widget")
                inputs.append(_Slot(str(s.get("name", "")), s.get("type"), _int(s.get("link")),
                                    str(w["name"]) if isinstance(w, dict) and "name" in w else None))
            outputs = [_Slot(str(s.get("name", "")), s.get("type")) if isinstance(s, dict) else _Slot("", None)
                       for s in n.get("outputs") or []]
            mode = _int(n.get("mode")) or 0
            title = n.get("title") if isinstance(n.get("title"), str) else ""
            props = n.get("properties") if isinstance(n.get("properties"), dict) else {}
            node = _Node(k, ntype, mode, title, n, inputs, outputs, props)
            if ntype in self.defs:
                node.subgraph = self.defs[ntype]
            if ntype.startswith(("workflow>", "workflow/")):
                self.issue("group_node", k, None, f"{where}: node {k} is a legacy group node ({ntype}); "
                           "group nodes are not expanded")
            g.nodes[k] = node
        # links: dedupe by target slot, then realign by input name (linkDeduplication.ts)
        referenced = {s.link for node in g.nodes.values() for s in node.inputs if s.link is not None}
        parsed: list[_Link] = []
        by_target: dict[tuple[str, int], int] = {}
        replaced: dict[int, int] = {}
        seen_ids: set[int] = set()
        for raw in raw_links:
            f = _link_fields(raw)
            lid = _int(f.get("id")) if f else None
            origin, target = (_key(f.get("origin_id")), _key(f.get("target_id"))) if f else (None, None)
            oslot, tslot = (_int(f.get("origin_slot")), _int(f.get("target_slot"))) if f else (None, None)
            if None in (lid, origin, target, oslot, tslot):
                self.issue("bad_link", None, None, f"{where}: malformed link {raw!r}")
                continue
            if lid in seen_ids:
                self.issue("bad_link", None, None, f"{where}: link id {lid} repeated; first kept")
                continue
            seen_ids.add(lid)
            origin, target = remap.get(origin, origin), remap.get(target, target)
            link = _Link(lid, origin, oslot, target, tslot, f.get("type"))
            tkey = (target, tslot)
            if tkey in by_target:
                survivor = parsed[by_target[tkey]]
                if lid in referenced and survivor.id not in referenced:
                    parsed[by_target[tkey]] = link
                    replaced[survivor.id] = lid
                    dropped, kept = survivor, link
                else:
                    replaced[lid] = survivor.id
                    dropped, kept = link, survivor
                if (dropped.origin, dropped.origin_slot) != (kept.origin, kept.origin_slot):
                    self.issue("bad_link", target, tslot, f"{where}: links {kept.id} and {dropped.id} both go to "
                               f"input {tslot} of node {target}; link {dropped.id} dropped")
                continue
            by_target[tkey] = len(parsed)
            parsed.append(link)
        for link in parsed:
            g.links[link.id] = link
        for node in g.nodes.values():
            for s in node.inputs:
                if s.link in replaced:
                    s.link = replaced[s.link]
        g.sub_input_links = [[replaced.get(i, i) for i in ids] for ids in g.sub_input_links]
        g.sub_output_links = [[replaced.get(i, i) for i in ids] for ids in g.sub_output_links]
        self._place_links(g, where)
        for ids in g.output_links.values():
            ids.sort()

    def _place_links(self, g: _Graph, where: str) -> None:
        in_sub = g.id is not None
        into: dict[str, list[_Link]] = {}
        for link in g.links.values():
            # origin
            if in_sub and link.origin == SUBGRAPH_INPUT_ID:
                if not 0 <= link.origin_slot < len(g.sub_inputs):
                    self.issue("bad_link", None, link.origin_slot, f"{where}: link {link.id} leaves subgraph "
                               f"input {link.origin_slot}, which does not exist")
                    continue
            else:
                onode = g.nodes.get(link.origin)
                if onode is None:
                    self.issue("bad_link", link.target, link.target_slot,
                               f"{where}: link {link.id} comes from node {link.origin}, which does not exist")
                    continue
                outs = onode.runtime_outputs
                known = onode.subgraph is not None or "outputs" in onode.raw
                if link.origin_slot < 0 or (known and link.origin_slot >= len(outs)):
                    self.issue("bad_link", link.origin, link.origin_slot,
                               f"{where}: link {link.id} leaves output {link.origin_slot} of node {link.origin} "
                               f"({onode.type}), which has {len(outs)} outputs")
                    continue
            # target
            if in_sub and link.target == SUBGRAPH_OUTPUT_ID:
                if not 0 <= link.target_slot < len(g.sub_outputs):
                    self.issue("bad_link", None, link.target_slot, f"{where}: link {link.id} enters subgraph "
                               f"output {link.target_slot}, which does not exist")
                    continue
                g.output_links.setdefault((link.origin, link.origin_slot), []).append(link.id)
                continue
            if link.target not in g.nodes:
                self.issue("bad_link", link.target, link.target_slot,
                           f"{where}: link {link.id} goes to node {link.target}, which does not exist")
                continue
            into.setdefault(link.target, []).append(link)
        for key, links in into.items():
            tnode = g.nodes[key]
            runtime = tnode.runtime_inputs
            # realignInputLinkSlots: each link moves to the input named like the saved input that references
            # it, unless a link that stays holds that slot
            desired: dict[int, int] = {}
            for link in links:
                names = [s.name for s in tnode.inputs if s.link == link.id]
                slots = [i for i, s in enumerate(runtime) if s.name in names]
                desired[link.id] = link.target_slot if not slots or link.target_slot in slots else slots[0]
            movers = {link.id for link in links if desired[link.id] != link.target_slot}
            holder = {link.target_slot: link.id for link in links}
            while True:
                blocked = {m for m in movers if holder.get(desired[m]) not in (None, m)
                           and holder[desired[m]] not in movers}
                if not blocked:
                    break
                movers -= blocked
            taken = {link.target_slot: link.id for link in links if link.id not in movers}
            for link in links:
                if link.id in movers:
                    if desired[link.id] in taken:
                        continue
                    link.target_slot = desired[link.id]
                    taken[link.target_slot] = link.id
            for link in links:
                slot = link.target_slot
                if not 0 <= slot < len(runtime):
                    self.issue("bad_link", key, slot, f"{where}: link {link.id} goes to input {slot} of node "
                               f"{key} ({tnode.type}), which has {len(runtime)} inputs")
                    continue
                if taken.get(slot) != link.id:
                    self.issue("bad_link", key, runtime[slot].name, f"{where}: link {link.id} cannot take input "
                               f"{runtime[slot].name!r} of node {key}: link {taken.get(slot)} holds it")
                    continue
                g.input_link[(key, slot)] = link.id
                g.output_links.setdefault((link.origin, link.origin_slot), []).append(link.id)

    def _load_widgets(self, node: _Node) -> None:
        if node.subgraph is not None or node.type in self.virtual_types:
            return
        names = self.names_for(node.type)
        node.names = names
        raw = node.raw.get("widgets_values")
        if raw is None and isinstance(node.raw.get("widgets_values_named"), dict):
            raw = node.raw["widgets_values_named"]
        values: dict[str, Any] = {}
        if isinstance(raw, list):
            if names is not None:
                if len(raw) != len(names):
                    self.issue("bad_widgets", node.key, None,
                               f"node {node.key} ({node.type}) has {len(raw)} widget values for {len(names)} "
                               f"widgets {names}")
                for name, value in zip(names, raw):
                    values.setdefault(name, value)
        elif isinstance(raw, dict):
            for name in (names if names is not None else raw):
                if name in raw:
                    values[name] = raw[name]
        elif raw is not None:
            self.issue("bad_widgets", node.key, None, f"node {node.key} ({node.type}): widgets_values is "
                       f"{type(raw).__name__}, not a list")
        if node.type in ("KSampler", "KSamplerAdvanced"):
            v = values.get("sampler_name")
            if isinstance(v, str) and v.startswith("sample_"):
                values["sampler_name"] = v[7:]
        control = values.get("control_after_generate")
        if isinstance(control, bool):  # old files
            values["control_after_generate"] = "randomize" if control else "fixed"
        node.loaded = values

    def _has_widget(self, node: _Node, name: str) -> bool:
        if node.names is not None:
            return name in node.names
        return node.subgraph is None and node.type not in self.virtual_types

    def _apply_primitive(self, g: _Graph, prim: _Node, root: _Graph) -> None:
        ids = g.output_links.get((prim.key, 0), [])
        if not ids:
            return  # no links at load: no widget, nothing to apply
        first = g.links[ids[0]]
        tnode = g.nodes.get(first.target)
        if tnode is None:
            return
        tin = tnode.runtime_inputs[first.target_slot]
        if tin.widget is None and tin.type not in _WIDGET_TYPES:
            return
        raw = prim.raw.get("widgets_values")
        if isinstance(raw, list) and raw:
            value = raw[0]
        elif isinstance(raw, dict) and "value" in raw:
            value = raw["value"]
        else:
            return
        if value and prim.props.get(_REPLACE_PROPERTY) and isinstance(value, str):
            value = self._text_replacements(root, value)
        for lid in ids:
            link = g.links[lid]
            target = g.nodes.get(link.target)
            if target is None:
                continue
            name = target.runtime_inputs[link.target_slot].widget
            if name is None or not self._has_widget(target, name):
                continue
            target.values[name] = value

    # ------------------------------------------------------------------------------------------- helpers

    def title_of(self, node: _Node) -> str:
        if node.title:
            return node.title
        if node.subgraph is not None:
            return node.subgraph.name
        if self.display_name is not None:
            name = self.display_name(node.type)
            if name:
                return name
        return node.type

    def _all_nodes(self, g: _Graph, seen: tuple = ()) -> Iterable[_Node]:
        """``collectAllNodes``: a subgraph instance's definition's nodes come before the instance."""
        for node in g.nodes.values():
            if node.subgraph is not None and node.subgraph.id not in seen:
                yield from self._all_nodes(node.subgraph, (*seen, node.subgraph.id))
            yield node

    def _text_replacements(self, root: _Graph, value: str) -> str:
        """``applyTextReplacements`` (searchAndReplace.ts)."""
        now = self.now or datetime.now()

        def repl(m: re.Match) -> str:
            text = m.group(1)
            split = text.split(".")
            if len(split) != 2:
                if split[0].startswith("date:"):
                    return _format_date(split[0][5:], now)
                return m.group(0)
            nodes = [n for n in self._all_nodes(root) if self._sr_name(n) == split[0]]
            if not nodes:
                nodes = [n for n in self._all_nodes(root) if self.title_of(n) == split[0]]
            if not nodes or not self._has_widget(nodes[0], split[1]) or split[1] not in nodes[0].values:
                return m.group(0)
            v = nodes[0].values[split[1]]
            return re.sub(r'[/?<>\\:*|"\x00-\x1f\x7f]', "_", _js_string("" if v is None else v))

        return re.sub(r"%([^%]+)%", repl, value)

    def _sr_name(self, node: _Node) -> Any:
        if _SR_PROPERTY in node.props:
            return node.props[_SR_PROPERTY]
        if node.subgraph is None and node.type not in self.virtual_types and node.type not in SAVE_NODE_TYPES:
            return node.type  # added at node creation for every backend type but the save nodes
        return None

    def _frontend_only(self, name: str) -> bool:
        return name in self.frontend_only or any(name.endswith(" " + f) for f in self.frontend_only)


def _format_date(text: str, date: datetime) -> str:
    """``formatDate`` (formatUtil.ts)."""
    parts = {"d": date.day, "M": date.month, "h": date.hour, "m": date.minute, "s": date.second}

    def repl(m: re.Match) -> str:
        t = m.group(0)
        if t == "yy":
            return str(date.year)[2:]
        if t == "yyyy":
            return str(date.year)
        if t[0] in parts:
            return str(parts[t[0]]).rjust(len(t), "0")
        return t

    return re.sub(r"dd?|MM?|hh?|mm?|ss?|yyy?y?", repl, text)


def _js_string(v: Any) -> str:
    """``String(v)`` for JSON values."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "Infinity" if v > 0 else "-Infinity"
        if v.is_integer() and abs(v) < 1e21:
            return str(int(v))
        return repr(v)
    if isinstance(v, list):
        return ",".join("" if x is None else _js_string(x) for x in v)
    if isinstance(v, dict):
        return "[object Object]"
    return str(v)


def process_dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """``processDynamicPrompt`` (formatUtil.ts): strip ``//`` and ``/* */`` comments, replace each ``{a|b|...}``
    (nestable) by one option at random; a backslash keeps the next character literal (and stays)."""
    rng = rng or random.Random()
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    i = 0

    def escape() -> str:
        nonlocal i
        nxt = text[i] if i < len(text) else "undefined"  # JS: input[i] past the end is undefined
        i += 1
        return "\\" + nxt

    def choice_block() -> str:
        nonlocal i
        options, choice, depth = [], "", 0
        while i < len(text):
            ch = text[i]
            i += 1
            if ch == "\\":
                choice += escape()
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if not depth:
                    break
                depth -= 1
            elif ch == "|" and not depth:
                options.append(choice)
                choice = ""
                continue
            choice += ch
        options.append(choice)
        return process_dynamic_prompt(options[int(rng.random() * len(options))], rng)

    result = ""
    while i < len(text):
        ch = text[i]
        i += 1
        if ch == "\\":
            result += escape()
        elif ch == "{":
            result += choice_block()
        else:
            result += ch
    return result


_CNR_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
_GITHUB_USER = re.compile(r"^(?!-)(?!.*--)[a-zA-Z0-9-]+(?<!-)$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([\da-z-]+(?:\.[\da-z-]+)*))?"
                     r"(?:\+([\da-z-]+(?:\.[\da-z-]+)*))?$")
_GIT_HASH = re.compile(r"^[0-9a-f]{4,40}$", re.IGNORECASE)


def _repo_like(v: Any) -> bool:
    return isinstance(v, str) and 1 <= len(v) <= 100 and bool(_CNR_ID.match(v)) and v[0] not in "_-." \
        and v[-1] not in "_-."


def _pack_meta(props: dict) -> dict:
    """``zNodePackMetadata`` parsing of ``cnr_id``, ``aux_id``, ``ver`` (workflowSchema.ts)."""
    out: dict[str, str] = {}
    if _repo_like(props.get("cnr_id")):
        out["cnr_id"] = props["cnr_id"]
    aux = props.get("aux_id")
    if isinstance(aux, str) and aux.count("/") == 1:
        user, repo = aux.split("/")
        if user and repo and len(user) <= 39 and _GITHUB_USER.match(user) and _repo_like(repo):
            out["aux_id"] = aux
    ver = props.get("ver")
    if isinstance(ver, str):
        if ver == "unknown":
            out["ver"] = ver
        else:
            stripped = ver[1:] if ver.startswith("v") else ver
            if _SEMVER.match(stripped) or _GIT_HASH.match(stripped):
                out["ver"] = stripped
    return out


# --------------------------------------------------------------------------------------------- execution


@dataclass
class _Widget:
    value: Any


@dataclass
class _Origin:
    id: str
    slot: int


class _Dto:
    """``ExecutableNodeDTO``: a node at one place in the subgraph instance tree."""

    def __init__(self, node: _Node, graph: _Graph, path: tuple[str, ...], host: _Dto | None):
        self.node, self.graph, self.path, self.host = node, graph, path, host
        self.id = ":".join((*path, node.key))
        self.values = dict(node.values)
        self.promoted: dict[int, Any] = {}  # subgraph instances: input index -> promoted widget value
        self.inner_overrides: dict[tuple[str, str], Any] = {}
        if host is not None:
            for (nid, wname), v in host.inner_overrides.items():
                if nid == node.key:
                    self.values[wname] = v


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


class _Prompt:
    def __init__(self, conv: _Converter, root: _Graph):
        self.c = conv
        self.root = root
        self.dtos: dict[str, _Dto] = {}

    def execution_order(self) -> list[_Node]:
        """``LGraph.computeExecutionOrder(false)``."""
        g = self.root
        order: list[_Node] = []
        start: list[_Node] = []
        pending: dict[str, _Node] = {}
        remaining: dict[str, int] = {}
        for node in g.nodes.values():
            pending[node.key] = node
            num = sum(1 for i in range(len(node.runtime_inputs)) if (node.key, i) in g.input_link)
            if num == 0:
                start.append(node)
            else:
                remaining[node.key] = num
        visited: set[int] = set()
        while start:
            node = start.pop(0)
            order.append(node)
            pending.pop(node.key, None)
            for slot in range(len(node.runtime_outputs)):
                for lid in g.output_links.get((node.key, slot), []):
                    if lid in visited:
                        continue
                    visited.add(lid)
                    target = g.links[lid].target
                    if target not in g.nodes or target not in remaining:
                        continue
                    remaining[target] -= 1
                    if remaining[target] == 0:
                        start.append(g.nodes[target])
        # loops: JS object key order, integer keys ascending first
        index_keys = sorted((k for k in pending if k.isdigit() and str(int(k)) == k and int(k) < 2 ** 32 - 1),
                            key=int)
        order.extend(pending[k] for k in index_keys)
        order.extend(n for k, n in pending.items() if k not in set(index_keys))
        return order

    def make_dto(self, node: _Node, graph: _Graph, path: tuple[str, ...], host: _Dto | None) -> _Dto:
        dto = _Dto(node, graph, path, host)
        if node.subgraph is not None:
            self._promote(dto)
        return dto

    def _promoted_source(self, sub: _Graph, index: int, seen: tuple = ()) -> tuple[bool, Any]:
        """The widget a definition input promotes: its first linked inner input that is a widget input."""
        ids = sub.sub_input_links[index] if index < len(sub.sub_input_links) else []
        ids = [i for i in ids if i in sub.links] or [
            lid for lid, l in sub.links.items() if l.origin == SUBGRAPH_INPUT_ID and l.origin_slot == index]
        for lid in ids:
            link = sub.links[lid]
            tnode = sub.nodes.get(link.target)
            if tnode is None or (link.target, link.target_slot) not in sub.input_link:
                continue
            tin = tnode.runtime_inputs[link.target_slot]
            if tnode.subgraph is not None:
                if tnode.subgraph.id in seen:
                    continue
                ok, value = self._promoted_source(tnode.subgraph, link.target_slot, (*seen, sub.id))
                if ok:
                    return True, value
                continue
            if tin.widget is not None and self.c._has_widget(tnode, tin.widget):
                return True, tnode.loaded.get(tin.widget)
        return False, None

    def _promote(self, dto: _Dto) -> None:
        node, sub = dto.node, dto.node.subgraph
        promoted_order = []
        for i, _ in enumerate(sub.sub_inputs):
            ok, value = self._promoted_source(sub, i, (sub.id,))
            if ok:
                dto.promoted[i] = value
                promoted_order.append(i)
        if dto.host is not None:  # a proxy entry of the enclosing instance naming this nested instance
            for (nid, wname), v in dto.host.inner_overrides.items():
                if nid == node.key:
                    for i, s in enumerate(sub.sub_inputs):
                        if s.name == wname and i in dto.promoted:
                            dto.promoted[i] = v
        values = node.raw.get("widgets_values")
        if not isinstance(values, list):
            return
        for position, i in enumerate(promoted_order):  # SubgraphNode._applyPromotedWidgetValues
            if position < len(values):
                dto.promoted[i] = values[position]
        proxies = node.props.get("proxyWidgets")
        if not isinstance(proxies, list):
            return
        for position, entry in enumerate(proxies):  # proxyWidgetMigration.ts, host value by entry index
            if position >= len(values) or not isinstance(entry, list) or len(entry) < 2:
                continue
            src, wname, value = _key(entry[0]), str(entry[1]), values[position]
            if src == "-1":  # a host input by name
                for i, s in enumerate(sub.sub_inputs):
                    if s.name == wname and i in dto.promoted:
                        dto.promoted[i] = value
                continue
            linked = [i for i in promoted_order if self._promotes(sub, i, src, wname)]
            if linked:
                dto.promoted[linked[0]] = value
                continue
            snode = sub.nodes.get(src) if src is not None else None
            if snode is None:
                continue
            if snode.type == "PrimitiveNode":
                for lid in sub.output_links.get((snode.key, 0), []):
                    link = sub.links[lid]
                    target = sub.nodes.get(link.target)
                    if target is not None:
                        w = target.runtime_inputs[link.target_slot].widget
                        if w is not None:
                            dto.inner_overrides[(target.key, w)] = value
            else:
                dto.inner_overrides[(snode.key, wname)] = value

    def _promotes(self, sub: _Graph, index: int, node_key: str | None, wname: str) -> bool:
        ids = sub.sub_input_links[index] if index < len(sub.sub_input_links) else []
        for lid in ids:
            link = sub.links.get(lid)
            if link is None:
                continue
            tnode = sub.nodes.get(link.target)
            if tnode is not None and tnode.key == node_key and (link.target, link.target_slot) in sub.input_link:
                if tnode.runtime_inputs[link.target_slot].widget == wname:
                    return True
        return False

    def inner_nodes(self, host: _Dto, seen: tuple) -> list[_Dto]:
        """``SubgraphNode.getInnerNodes``."""
        sub = host.node.subgraph
        if sub.id in seen:
            self.c.issue("bad_subgraph", host.id, None, f"subgraph {sub.id} contains itself (at {host.id})")
            return []
        self.dtos.setdefault(host.id, host)
        path = (*host.path, host.node.key)
        out: list[_Dto] = []
        for node in sub.nodes.values():
            dto = self.make_dto(node, sub, path, host)
            if node.subgraph is not None:
                self.dtos.setdefault(dto.id, dto)
                if node.mode not in (MODE_NEVER, MODE_BYPASS):  # see the module docstring
                    out.extend(self.inner_nodes(self.dtos[dto.id], (*seen, sub.id)))
            else:
                self.dtos.setdefault(dto.id, dto)
                out.append(self.dtos[dto.id])
        return out

    # --------------------------------------------------------------------------------------- resolution

    def resolve_input(self, dto: _Dto, slot: int, visited: set, type_: Any = None) -> _Origin | _Widget | None:
        key = f"{dto.id}[I]{slot}"
        if key in visited:
            self.c.issue("cycle", dto.id, slot, f"circular link resolution at input {slot} of node {dto.id}")
            return None
        visited.add(key)
        inputs = dto.node.runtime_inputs
        if not 0 <= slot < len(inputs):
            self.c.issue("bad_link", dto.id, slot, f"node {dto.id} has no input {slot}")
            return None
        lid = dto.graph.input_link.get((dto.node.key, slot))
        if lid is None:
            return None
        link = dto.graph.links[lid]
        if dto.host is not None and link.origin == SUBGRAPH_INPUT_ID:
            host = dto.host
            index = link.origin_slot
            if (host.node.key, index) not in host.graph.input_link:
                return _Widget(host.promoted[index]) if index in host.promoted else None
            return self.resolve_input(host, index, visited)
        origin = dto.graph.nodes.get(link.origin)
        if origin is None:
            return None  # reported when the links were read
        odto = self.dtos.get(":".join((*dto.path, origin.key)))
        if odto is None:
            return None
        return self.resolve_output(odto, link.origin_slot, type_ if type_ is not None else inputs[slot].type,
                                   visited)

    def resolve_output(self, dto: _Dto, slot: int, type_: Any, visited: set) -> _Origin | _Widget | None:
        key = f"{dto.id}[O]{slot}"
        if key in visited:
            self.c.issue("cycle", dto.id, slot, f"circular link resolution at output {slot} of node {dto.id}")
            return None
        visited.add(key)
        node = dto.node
        if node.mode == MODE_NEVER:
            return None
        if node.mode == MODE_BYPASS:
            index = self._bypass_index(dto, slot, type_)
            if index < 0:
                return None
            return self.resolve_input(dto, index, visited)
        if node.subgraph is not None:
            sub = node.subgraph
            if not 0 <= slot < len(sub.sub_outputs):
                self.c.issue("bad_link", dto.id, slot, f"subgraph node {dto.id} has no output {slot}")
                return None
            ids = [i for i in sub.sub_output_links[slot] if i in sub.links] or [
                lid for lid, l in sub.links.items() if l.target == SUBGRAPH_OUTPUT_ID and l.target_slot == slot]
            if not ids:
                return None
            link = sub.links[ids[0]]
            inner = sub.nodes.get(link.origin)
            if inner is None:
                self.c.issue("bad_link", dto.id, slot, f"output {slot} of subgraph node {dto.id} is fed "
                             "straight from a subgraph input; the frontend cannot resolve that")
                return None
            idto = self.dtos.get(":".join((*dto.path, node.key, inner.key)))
            if idto is None:
                return None
            return self.resolve_output(idto, link.origin_slot, type_, visited)
        if node.type in self.c.virtual_types:
            if slot < len(node.runtime_inputs) and (node.key, slot) in dto.graph.input_link:
                return self.resolve_input(dto, slot, visited, type_)
            return None
        return _Origin(dto.id, slot)

    def _bypass_index(self, dto: _Dto, slot: int, type_: Any) -> int:
        """``ExecutableNodeDTO._getBypassSlotIndex``."""
        inputs = dto.node.runtime_inputs
        outputs = dto.node.runtime_outputs
        if type_ in ("*", ""):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        out_type = outputs[slot].type if slot < len(outputs) else None
        if slot < len(inputs) and _valid_connection(inputs[slot].type, out_type) \
                and _valid_connection(inputs[slot].type, type_):
            return slot
        for i, s in enumerate(inputs):
            if s.type == type_:
                return i
        for i, s in enumerate(inputs):
            if _valid_connection(s.type, out_type) and _valid_connection(s.type, type_):
                return i
        return -1

    # ------------------------------------------------------------------------------------------- output

    def build(self) -> dict:
        order = self.execution_order()
        dto_map: dict[str, _Dto] = {}
        for node in order:  # graphToPrompt: the top-level DTOs first, every one of them
            dto = self.make_dto(node, self.root, (), None)
            self.dtos[dto.id] = dto
        for node in order:
            dto = self.dtos[node.key]
            dto_map.setdefault(dto.id, dto)
            if node.mode in (MODE_NEVER, MODE_BYPASS):
                continue
            if node.subgraph is not None:
                for inner in self.inner_nodes(dto, ()):
                    dto_map.setdefault(inner.id, inner)
        output: dict[str, dict] = {}
        for dto in dto_map.values():
            node = dto.node
            if node.subgraph is not None or node.type in self.c.virtual_types or node.mode in (MODE_NEVER,
                                                                                              MODE_BYPASS):
                continue
            inputs: dict[str, Any] = {}
            dynamic = set(self.c.dynamic_prompts(node.type) or ()) if self.c.dynamic_prompts else set()
            names = node.names if node.names is not None else list(dto.values)
            for name in names:
                if self.c._frontend_only(name) or name not in dto.values:
                    continue
                value = dto.values[name]
                if name == "filename_prefix" and node.type in SAVE_NODE_TYPES and isinstance(value, str):
                    value = self.c._text_replacements(self.root, value)
                if name in dynamic and isinstance(value, str):
                    value = process_dynamic_prompt(value, self.c.rng)
                inputs[name] = _wrap(value)
            for i, slot in enumerate(node.runtime_inputs):
                resolved = self.resolve_input(dto, i, set())
                if resolved is None:
                    continue
                if isinstance(resolved, _Widget):
                    inputs[slot.name] = _wrap(resolved.value)
                else:
                    inputs[slot.name] = [resolved.id, resolved.slot]
            meta = {"title": self.c.title_of(node)}
            if self.c.pack_meta:
                meta.update(_pack_meta(node.props))
            output[dto.id] = {"inputs": inputs, "class_type": node.type, "_meta": meta}
        for entry in output.values():  # remove inputs connected to removed nodes
            for name in [n for n, v in entry["inputs"].items()
                         if isinstance(v, list) and len(v) == 2 and v[0] not in output]:
                del entry["inputs"][name]
        return output


def ui_to_api(workflow: dict, widget_names: Callable[[str], list[str] | None], *,
              display_name: Callable[[str], str | None] | None = None,
              dynamic_prompts: Callable[[str], Iterable[str] | None] | None = None,
              rng: random.Random | None = None, now: datetime | None = None,
              frontend_only: Iterable[str] = FRONTEND_ONLY_WIDGETS,
              virtual_types: Iterable[str] = VIRTUAL_NODE_TYPES, pack_meta: bool = True,
              strict: bool = False) -> tuple[dict, list[Issue]]:
    """Convert a UI workflow (version 0.4 or 1, with ``definitions.subgraphs``) to the API prompt the frontend
    would POST, following ``graphToPrompt`` (rules in the module docstring). Returns ``(prompt, issues)``:
    ``bad_link`` (links to missing nodes, slots or subgraph ports; several links into one input),
    ``bad_widgets`` (``widgets_values`` of the wrong length where ``widget_names`` knows the type),
    ``duplicate_node``, ``bad_node``, ``bad_subgraph``, ``cycle``, ``group_node``. Unknown node types are left to
    the caller: every prompt entry has its ``class_type``.

    ``widget_names(class_type)``: the type's persisted widget names in order (module docstring), or ``None``.
    ``display_name(class_type)``: the title of nodes saved without one (default: the class type).
    ``dynamic_prompts(class_type)``: names of widgets with ``dynamicPrompts`` (their ``{a|b}`` are expanded with
    ``rng``). ``now``: the time for ``%date:...%`` in ``filename_prefix`` (default: now). ``pack_meta``: copy
    ``cnr_id``/``aux_id``/``ver`` into ``_meta`` as the frontend does. ``strict``: raise :class:`WorkflowError`
    with every issue instead of returning them. Raises :class:`WorkflowError` (``not_ui``) for anything that is
    not a UI workflow."""
    if not _is_ui(workflow):
        raise WorkflowError([Issue("not_ui", None, None, "not a UI workflow (needs a 'nodes' list and 'links')")])
    conv = _Converter(copy.deepcopy(workflow), widget_names, display_name=display_name, dynamic_prompts=dynamic_prompts,
                      rng=rng, now=now, frontend_only=frontend_only, virtual_types=virtual_types,
                      pack_meta=pack_meta)
    root = conv.load()
    prompt = _Prompt(conv, root).build()
    issues = list(dict.fromkeys(conv.issues))
    if strict and issues:
        raise WorkflowError(issues)
    return prompt, issues
