"""docs/nodes.md is generated from the registry and must not go stale."""

from __future__ import annotations

import difflib
from pathlib import Path

from nodegraph.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "nodes.md"
REGENERATE = "nodegraph nodes --markdown --pack builtin > docs/nodes.md"


def test_nodes_md_matches_the_registry(capsys) -> None:
    capsys.readouterr()
    assert main(["nodes", "--markdown", "--pack", "builtin"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("# Node reference")
    assert "`sample.euler`" in generated and "`vae.decode`" in generated
    current = DOC.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(current.splitlines(True), generated.splitlines(True),
                                        "docs/nodes.md", "generated", n=1))
    assert current == generated, (
        f"docs/nodes.md is stale; regenerate it from the repository root with:\n    {REGENERATE}\n"
        f"first differences:\n{diff[:3000]}")


def test_nodes_md_documents_every_builtin_node_type(capsys) -> None:
    from nodegraph import default_registry

    text = DOC.read_text(encoding="utf-8")
    builtin = [d.type_id for d in default_registry() if d.pack == "builtin"]
    assert builtin, "no builtin node types registered"
    missing = [t for t in builtin if f"### `{t}` " not in text]
    assert not missing, f"docs/nodes.md lacks {missing}; regenerate with: {REGENERATE}"
