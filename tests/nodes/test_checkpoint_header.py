"""Safetensors headers read before any weights: truncation, sharded indexes, pickle refusal (no model libraries)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nodes.checkpoints.header import WeightsError, load_tensors, read_header


def test_a_sharded_index_reads_as_one_header_over_its_shards(tmp_path):
    save_file({"a.weight": torch.ones(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.full((4,), 2.0)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    header = read_header(tmp_path / "model.safetensors.index.json")
    assert header.shape("a.weight") == (2, 3) and header.shape("b.weight") == (4,) and len(header.files) == 2
    tensors = load_tensors(header)
    assert torch.equal(tensors["b.weight"], torch.full((4,), 2.0))
    index["weight_map"]["c.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="outside its folder"):
        read_header(tmp_path / "model.safetensors.index.json")
    index["weight_map"]["c.weight"] = "model-00003-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="missing"):
        read_header(tmp_path / "model.safetensors.index.json")


def test_truncated_malformed_and_pickle_files_are_refused_before_reading_weights(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(WeightsError, match="truncated"):
        read_header(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="malformed"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(WeightsError, match="truncated or not safetensors"):
        read_header(path)
    pickle = tmp_path / "m.ckpt"
    pickle.write_bytes(b"never opened")
    with pytest.raises(WeightsError, match="pickle"):
        read_header(pickle)
