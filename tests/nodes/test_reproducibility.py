"""What is bit-identical, and when (docs/diffusion.md, "Reproducibility"), on the shipped img2img graph.

* the same thread count gives the same bytes, run after run, in fresh engines and in another process;
* another CPU thread count gives images within one 8-bit level (oneDNN's 1x1 convolutions with a bias, and MKL's
  matrix multiply at thread counts that are not powers of two, order their sums by thread count);
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from nodegraph import Engine

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@contextmanager
def threads(n: int, onednn: bool = True) -> Iterator[None]:
    before, enabled = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(n)
    torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.backends.mkldnn.enabled = enabled


def img2img(tmp_path: Path) -> torch.Tensor:
    """The shipped graph's image, from a fresh engine (no cache shared between runs)."""
    engine = Engine(device="cpu", input_root=GRAPHS, output_root=tmp_path)
    return engine.run(json.loads((GRAPHS / "img2img.json").read_text()), outputs=["image"]).outputs["image"]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.clamp(0, 1).mul(255).round().to(torch.int16)  # as image.save quantises


def test_the_same_thread_count_gives_the_same_bytes(tmp_path: Path) -> None:
    for n in (1, 2):
        with threads(n):
            first, second = img2img(tmp_path), img2img(tmp_path)
        assert torch.equal(first, second), f"{n} thread(s): two runs differ"


def test_thread_counts_differ_by_at_most_one_level(tmp_path: Path) -> None:
    with threads(1):
        one = img2img(tmp_path)
    for n in (2, 3):
        with threads(n):
            other = img2img(tmp_path)
        assert (one - other).abs().max() < 1e-4
        assert (to_uint8(one) - to_uint8(other)).abs().max() <= 1


def test_another_process_gives_the_same_bytes(tmp_path: Path) -> None:
    script = (f"import hashlib, json, torch; from nodegraph import Engine; torch.set_num_threads(1); "
              f"g = json.loads(open({str(GRAPHS / 'img2img.json')!r}).read()); "
              f"e = Engine(device='cpu', input_root={str(GRAPHS)!r}, output_root={str(tmp_path)!r}); "
              f"x = e.run(g, outputs=['image']).outputs['image']; "
              f"print(hashlib.sha256(x.numpy().tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    with threads(1):
        here = hashlib.sha256(img2img(tmp_path).numpy().tobytes()).hexdigest()
    assert other.stdout.strip() == here


def test_the_thread_dependence_is_onednns_1x1_convolution() -> None:
    """The op the investigation found: a 1x1 convolution with a bias (``nn.Conv2d``, as a ResBlock's
    channel-changing skip, here the U-Net's 48 -> 96) through oneDNN. A 3x3 convolution and a linear layer of the
    same sizes do not depend on the thread count, nor does the 1x1 convolution with oneDNN off."""
    gen = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 48, 8, 8, generator=gen), torch.randn(96, generator=gen)
    w1, w3 = torch.randn(96, 48, 1, 1, generator=gen), torch.randn(96, 48, 3, 3, generator=gen)
    lin = torch.randn(96, 48, generator=gen)

    def ops() -> list[torch.Tensor]:
        F = torch.nn.functional
        return [F.conv2d(x, w1, bias), F.conv2d(x, w3, bias, padding=1), F.linear(x.movedim(1, -1), lin, bias)]

    runs = {}
    for onednn in (True, False):
        for n in (1, 2):
            with threads(n, onednn):
                runs[onednn, n] = ops()
    for onednn in (True, False):
        assert all(torch.equal(a, b) for a, b in zip(runs[onednn, 1][1:], runs[onednn, 2][1:]))
    assert torch.equal(runs[False, 1][0], runs[False, 2][0])
    assert not torch.equal(runs[True, 1][0], runs[True, 2][0]), (
        "oneDNN's 1x1 convolution no longer depends on the thread count: update docs/diffusion.md, Reproducibility")
