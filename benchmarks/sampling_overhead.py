"""Sampling benchmark: prints a table.

1. Per-step overhead of a graph-defined sampler (``sample.euler``: loop + ``denoise`` + ``step.euler`` nodes)
   vs the same sampler as a plain Python loop, on a small random U-Net (target ratio <= 1.05).
2. Peak memory of classifier-free guidance in ``batched`` vs ``sequential`` mode. Each mode runs in a fresh
   subprocess; on CPU the figure is the growth of peak RSS over the RSS just before sampling, on CUDA it is
   ``torch.cuda.max_memory_allocated`` growth.

Run: ``python benchmarks/sampling_overhead.py [--steps 20] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _table import print_table

from nodegraph import Engine
from nodegraph.roots import ModelRoots
from nodes.adapters import DenoiserInfo, DenoiserModel, Guided
from nodes.diffusion import steps as S
from nodes.models import text, unet, vae
from nodes.models.config import save_folder

BENCH_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  context_dim=64, norm_groups=8)


def build_models(root: Path, *, width: int = 64, unet_kw: dict | None = None) -> dict[str, str]:
    torch.manual_seed(0)
    v = vae.AutoencoderKL(vae.VAEConfig.from_name("tiny-test"))
    t = text.TextEncoder(text.TextConfig(max_length=32, width=width, layers=1, heads=2))
    u = unet.UNet(unet.UNetConfig(**{**BENCH_UNET, "context_dim": width, **(unet_kw or {})}))
    paths = {name: str(root / name) for name in ("vae", "text", "unet")}
    save_folder(v, paths["vae"])
    save_folder(t, paths["text"])
    save_folder(u, paths["unet"])
    DenoiserInfo(prediction="eps", train_schedule="sd15", latent_space=v.config.space).write(paths["unet"])
    return paths


def txt2img_graph(paths: dict[str, str], steps: int, size: int, mode: str = "batched", batch: int = 1,
                  scale: float = 5.0) -> dict:
    def link(node: str, output: str) -> dict:
        return {"node": node, "output": output}

    return {"version": 1, "nodes": {
        "vae": {"type": "model.load_vae", "inputs": {"path": paths["vae"]}},
        "te": {"type": "model.load_text_encoder", "inputs": {"path": paths["text"]}},
        "unet": {"type": "model.load_denoiser", "inputs": {"path": paths["unet"]}},
        "prompt": {"type": "text.encode", "inputs": {"encoder": link("te", "encoder"), "text": "a red circle",
                                                     "batch": batch}},
        "negative": {"type": "text.encode", "inputs": {"encoder": link("te", "encoder"), "text": ""}},
        "cfg": {"type": "guidance.cfg", "inputs": {"model": link("unet", "model"), "negative": link("negative", "cond"),
                                                   "scale": scale, "mode": mode}},
        "sigmas": {"type": "schedule.scheduler", "inputs": {"model": link("unet", "model"), "steps": steps}},
        "empty": {"type": "latent.empty", "inputs": {"vae": link("vae", "vae"), "width": size, "height": size,
                                                     "batch": batch}},
        "noise": {"type": "latent.noise", "inputs": {"like": link("empty", "latent"), "seed": 1}},
        "start": {"type": "latent.add_noise", "inputs": {"model": link("unet", "model"), "latent": link("empty", "latent"),
                                                         "noise": link("noise", "noise"), "sigmas": link("sigmas", "sigmas")}},
        "sample": {"type": "sample.euler", "inputs": {"model": link("cfg", "model"), "latent": link("start", "latent"),
                                                      "sigmas": link("sigmas", "sigmas"), "cond": link("prompt", "cond")}},
    }, "outputs": {"latent": link("sample", "latent")}}


def bench_overhead(paths: dict[str, str], steps: int, repeats: int, size: int) -> tuple[str, str]:
    engine = Engine(device="cpu", max_workers=1, model_roots=ModelRoots(allow_paths=True))
    graph = txt2img_graph(paths, steps, size)
    first = engine.run(graph)  # loads models; later runs re-execute only the sampler (models stay cached)
    plan, _ = engine.plan(graph)
    sampler_key = plan.steps["sample/loop"].key
    # Pull the exact objects the graph used, so both loops do identical work.
    inputs = {}
    for sid in ("cfg", "prompt", "start", "sigmas"):
        inputs[sid] = engine.cache.get(plan.steps[sid].key)[0]
    model, cond = inputs["cfg"]["model"], inputs["prompt"]["cond"]
    x0, sigmas = inputs["start"]["latent"], inputs["sigmas"]["sigmas"]

    def plain() -> torch.Tensor:
        with torch.inference_mode():
            x = x0
            for i in range(len(sigmas) - 1):
                d = model(x, sigmas[i], cond)
                x = S.euler_step(x, d, sigmas[i], sigmas[i + 1])
            return x

    ref = plain()
    assert torch.equal(ref, first.outputs["latent"]), "graph sampler and plain loop disagree"
    plain_t, graph_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        plain_t.append(time.perf_counter() - t0)
        engine.cache.evict(sampler_key)
        result = engine.run(graph)
        assert result.report.executed == ["sample/loop"], result.report.executed
        graph_t.append(result.report.seconds["sample/loop"])
    p, g = statistics.median(plain_t), statistics.median(graph_t)
    return (f"euler {steps} steps, CFG batched, U-Net {size}x{size} image",
            f"plain {p / steps * 1e3:.2f} ms/step, graph {g / steps * 1e3:.2f} ms/step, ratio {g / p:.3f}x")


def _memory_child(paths_json: str, mode: str, steps: int, size: int, batch: int) -> None:
    paths = json.loads(paths_json)
    engine = Engine(device="auto", max_workers=1, model_roots=ModelRoots(allow_paths=True))
    graph = txt2img_graph(paths, steps, size, mode=mode, batch=batch)
    prep = {**graph, "outputs": {"start": {"node": "start", "output": "latent"}, "cfg": {"node": "cfg", "output": "model"},
                                 "prompt": {"node": "prompt", "output": "cond"}}}
    engine.run(prep)  # load and prepare everything but the sampler
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = engine.run(graph)
    assert result.report.executed == ["sample/loop"], result.report.executed
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": peak - base, "device": "cuda" if cuda else "cpu"}))


def bench_memory(paths: dict[str, str], steps: int, size: int, batch: int) -> list[tuple[str, str]]:
    rows = []
    growth = {}
    for mode in ("batched", "sequential"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(paths), mode, str(steps),
                              str(size), str(batch)], capture_output=True, text=True, check=True)
        data = json.loads(out.stdout.strip().splitlines()[-1])
        growth[mode] = data["growth"]
        what = "peak RSS growth" if data["device"] == "cpu" else "CUDA peak allocation growth"
        rows.append((f"CFG {mode}, batch {batch}, {size}x{size}, {data['device']}",
                     f"{what} during sampling: {data['growth'] / 2**20:.1f} MiB"))
    if growth["sequential"] > 0:
        rows.append(("CFG memory ratio batched / sequential", f"{growth['batched'] / growth['sequential']:.2f}x"))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-child":
        _memory_child(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="image size; the latent is size/2 with the tiny VAE")
    ap.add_argument("--memory-size", type=int, default=256)
    ap.add_argument("--memory-batch", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp))
        rows.append(bench_overhead(paths, args.steps, args.repeats, args.size))
        rows.extend(bench_memory(paths, 4, args.memory_size, args.memory_batch))
    print_table(rows, f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
