"""The built-in node library. It registers through the ``nodegraph.nodes`` entry point like any third-party pack."""

from __future__ import annotations

import importlib

MODULES = ("nodes.core", "nodes.image_ops", "nodes.sampling", "nodes.model_nodes", "nodes.shapes_nodes",
           "nodes.control", "nodes.three_d", "nodes.sds", "nodes.checkpoint_nodes")


def register(registry, pack: str = "builtin") -> None:
    for name in MODULES:
        registry.add_module(importlib.import_module(name), pack)
    model_nodes = importlib.import_module("nodes.model_nodes")
    for folder in model_nodes.SHIPPED_FOLDERS:  # the shipped weights: "tiny-shapes/dit" in every loader's folder
        registry.add_model_folder(folder, model_nodes.WEIGHTS_ROOT)
