"""The shapes generator and scorer as nodes, the scoring command, and graph-relative input files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nodegraph import Engine
from nodegraph.cli import main as cli_main
from nodegraph.outputs import save_png
from nodes.shapes import data
from nodes.shapes.score import main as score_main


def _run(graph: dict, **kw):
    return Engine(device="cpu", **kw).run(graph)


def test_generate_node_is_the_dataset_batch():
    g = {"version": 1, "nodes": {"gen": {"type": "shapes.generate", "inputs": {"seed": 5, "count": 4}}},
         "outputs": {"images": {"node": "gen", "output": "images"}, "captions": {"node": "gen", "output": "captions"}}}
    out = _run(g).outputs
    images, captions, _ = data.batch(5, 4)
    assert out["captions"] == captions
    assert torch.equal((out["images"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1), torch.from_numpy(images))


def test_eval_node_scores_true_captions_high_and_swapped_ones_low():
    def graph(captions_from: str) -> dict:
        caps = {"node": "gen", "output": "captions"} if captions_from == "true" else ["two white triangles"] * 12
        return {"version": 1, "nodes": {
            "gen": {"type": "shapes.generate", "inputs": {"seed": 1, "count": 12}},
            "ev": {"type": "eval.shapes", "inputs": {"images": {"node": "gen", "output": "images"}, "captions": caps}}},
            "outputs": {"summary": {"node": "ev", "output": "summary"}}}

    true = _run(graph("true")).outputs["summary"]["overall"]["accuracy"]
    wrong = _run(graph("wrong")).outputs["summary"]["overall"]["accuracy"]
    assert true == 1.0
    assert wrong < 0.5
    json.dumps(_run(graph("true")).outputs["summary"])  # plain JSON values, so the CLI can write it


def test_score_command_reads_the_caption_from_the_png_graph(tmp_path, capsys):
    caption = "a large green square on the right"
    img = data.render(caption, seed=3)
    graph = {"version": 1, "nodes": {"prompt": {"type": "text.encode", "inputs": {"text": caption}}}}
    tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    save_png(tensor, tmp_path / "a.png", json.dumps(graph))
    Image.fromarray(data.render("a red circle", seed=1)).save(tmp_path / "b.png")  # no graph inside
    rc = score_main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["file"] for r in out["results"]] == [str(tmp_path / "a.png")]
    assert out["results"][0]["correct"] is True and out["results"][0]["caption"] == caption
    assert out["missing_caption"] == [str(tmp_path / "b.png")]


def test_cli_input_files_resolve_against_the_graph_folder(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "project"
    (folder / "assets").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "assets" / "in.png")
    graph = {"version": 1, "nodes": {"load": {"type": "image.load", "inputs": {"path": "assets/in.png"}},
                                     "stats": {"type": "tensor.stats", "inputs": {"x": {"node": "load", "output": "image"}}}},
             "outputs": {"mean": {"node": "stats", "output": "mean"}}}
    (folder / "g.json").write_text(json.dumps(graph))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = cli_main(["run", str(folder / "g.json"), "--json", "--out", str(tmp_path / "out")])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert abs(json.loads(Path(doc["outputs"]["mean"][0]).read_text()) - 200 / 255) < 1e-6
    # An explicit --input-root elsewhere confines reads there: the same relative path is then missing.
    rc = cli_main(["run", str(folder / "g.json"), "--json", "--out", str(tmp_path / "out2"), "--input-root", "."])
    assert rc == 1
    assert json.loads(capsys.readouterr().out)["error"]["node"] == "load"
