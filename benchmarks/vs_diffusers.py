"""Ours vs diffusers on the same checkpoint: prints a table.

Ours is ``graphs/checkpoint_txt2img.json`` through an :class:`nodegraph.Engine`; theirs is the diffusers pipeline
loaded from the same diffusers folder (``from_pretrained(local_files_only=True)``, Euler, CFG, float32, CPU
generator). Both run diffusers' U-Net and VAE and transformers' CLIP on the same weights and settings, and every
timed call of both sides uses one seed, so each row also checks that the images agree (max abs difference): a
row never compares different work.

1. Wall time per sampling step: (t(N2) - t(N1)) / (N2 - N1), each t the minimum over the repeats of a whole call
   (a fresh seed each call, so ours never answers from its cache). Fixed costs (prompt encoding, decoding,
   planning) cancel; the ratio ours / theirs is the step overhead (target <= 1.02x). Ours is measured twice: the
   Engine as built (its thread pool) and its synchronous submit (``max_workers=1``, every step in the calling
   thread), to tell the executor's threading from the sampler's own cost.
2. Load + first call, and a second call that changes only the seed: ours re-executes only the seed's
   descendants (the nodes executed are listed, with the seconds each took), the pipeline re-encodes the prompt.
3. Peak RSS of one load + one generation, each in a fresh subprocess of this script (``--rss``): ours from the
   folder, ours from the single file, the pipeline; also the RSS right after the imports, so the model's share is
   visible (target ours / theirs <= 1.0x). On Linux the peak is ``VmHWM``: ``ru_maxrss`` of a child carries over
   its parent's peak (here the parent holds the models), so it would read the same number for every child.

Rows: the tiny SD1.x, SD2.x (v) and SDXL checkpoints of ``tests/nodes/sd_fixtures.py`` (64x64, 4 vs 12 steps)
and, with ``--real``, random weights in the real SD1.5 architecture (860M-parameter U-Net, the SD1.5 VAE,
CLIP ViT-L/14 text encoder; 512x512, 2 vs 3 steps), written as a diffusers folder and a single file.

Run: ``python benchmarks/vs_diffusers.py [--quick | --real] [--repeats 3] [--real-repeats 1] [--threads N]
[--cache DIR]``

* ``--quick``: the tiny rows only: about 2 minutes on 2 busy CPU cores (per row ~10 s of timing, ~30 s for the
  three RSS subprocesses; ~15 s to build the three checkpoints).
* ``--real`` (the default): also the real-size row: 8 GB of disk (folder and file, 4 GB each), about 7 GB of
  memory at the peak (the two sides map the same weight files), 14 minutes on 2 busy CPU cores: building and
  writing the checkpoint ~1 min, timing ~7 min (each side: a first call and ``--real-repeats`` calls at 2 and at
  3 steps), RSS ~4 min (three subprocesses, each a load and a 2-step call). Most of it is the 512x512 U-Net
  (~10 s per batched call on 2 cores) and VAE decode (~18 s).
* ``--cache DIR``: build the real-size checkpoint in DIR and keep it (reused when already there); without it
  the checkpoint goes to a temporary folder deleted at the end.
* ``--threads N``: torch's intra-op threads (default: torch's own choice), the same for both sides and passed on
  to the RSS subprocesses.

Nothing contacts a model hub (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``DIFFUSERS_OFFLINE``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_k] = "1"

import torch  # noqa: E402
from _table import print_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.nodes.sd_fixtures

from nodegraph import Engine  # noqa: E402

GRAPH = json.loads((REPO / "graphs" / "checkpoint_txt2img.json").read_text())
PROMPT = "a red circle on a blue square, highly detailed"
SCALE = 5.0
SEED_ONLY = {"noise", "start", "sampler/loop", "decode"}  # what a new seed must re-execute, and nothing more
REAL_NAME = "sd15-random"


@dataclass(frozen=True)
class Case:
    label: str
    family: str
    root: Path  # the model root: diffusers/<name>/ and checkpoints/<name>.safetensors
    name: str
    size: int
    steps: tuple[int, int]
    repeats: int

    @property
    def folder(self) -> Path:
        return self.root / "diffusers" / self.name

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"


def log(msg: str) -> None:
    print(f"[vs_diffusers] {msg}", file=sys.stderr, flush=True)


# -- the two sides ---------------------------------------------------------------------------------------------


def quiet() -> None:
    """No progress bars or advisory warnings from the reference libraries (the table is the output)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def overrides(case: Case, steps: int, seed: int, name: str | None = None) -> dict:
    return {"checkpoint.name": name or case.name, "latent.width": case.size, "latent.height": case.size,
            "sigmas.steps": steps, "guidance.scale": SCALE, "noise.seed": seed, "prompt.text": PROMPT}


def run_ours(engine: Engine, case: Case, steps: int, seed: int, name: str | None = None, workers: int | None = None):
    """One call; ``workers=1`` runs it on the engine's synchronous submit (every step in this thread)."""
    default = engine.executor.max_workers
    engine.executor.max_workers = workers or default
    try:
        t0 = time.perf_counter()
        result = engine.run(GRAPH, overrides(case, steps, seed, name))
        return time.perf_counter() - t0, result.outputs["image"], result
    finally:
        engine.executor.max_workers = default


def forget(engine: Engine, result) -> None:
    """Drop what a call computed from the cache, so that the next call with the same seed does the same work."""
    for sid in result.report.executed:
        engine.cache.evict(result.plan.steps[sid].key)


def load_pipeline(case: Case):
    import diffusers

    extra = {} if case.family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(case.folder), local_files_only=True, **extra)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_theirs(pipe, case: Case, steps: int, seed: int):
    t0 = time.perf_counter()
    image = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=SCALE, height=case.size,
                 width=case.size, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images
    return time.perf_counter() - t0, image


# -- timing ----------------------------------------------------------------------------------------------------

SIDES = ("ours", "ours sync", "diffusers")  # ours: the Engine as built (thread pool); sync: max_workers=1


def bench_case(case: Case) -> list[tuple[str, str]]:
    """Load + first call, then ``repeats`` calls at N1 (each a second call: only the seed changes), then at N2.

    Every call is made by the three sides in turn with the same seed (machine noise hits them alike)."""
    n1, n2 = case.steps
    engine = Engine(device="cpu", model_roots=[case.root])
    t_first, ours, first = run_ours(engine, case, n1, seed=0)
    t0 = time.perf_counter()
    pipe = load_pipeline(case)
    t_load = time.perf_counter() - t0
    t_theirs, theirs = run_theirs(pipe, case, n1, seed=0)
    log(f"{case.label}: load + first call: ours {t_first:.3f} s, diffusers {t_load + t_theirs:.3f} s")
    diff, std = float((ours - theirs).abs().max()), float(theirs.std())
    times = {(side, n): [] for side in SIDES for n in (n1, n2)}
    second = {side: [] for side in SIDES[:2]}  # (seconds, report) of ours' calls that change only the seed
    seed = 1
    for n in (n1, n2):
        for r in range(case.repeats):
            got = {"ours": run_ours(engine, case, n, seed)}
            forget(engine, got["ours"][2])
            got["ours sync"] = run_ours(engine, case, n, seed, workers=1)
            got["diffusers"] = run_theirs(pipe, case, n, seed)
            for side, (t, image, *result) in got.items():
                times[side, n].append(t)
                diff = max(diff, float((image - got["diffusers"][1]).abs().max()))
                if n == n1 and result:
                    second[side].append((t, result[0].report))
            seed += 1
            log(f"{case.label}: {n} steps, repeat {r + 1}: " + ", ".join(f"{k} {v[0]:.3f} s" for k, v in got.items()))
    del pipe, engine
    best = {key: min(v) for key, v in times.items()}
    per = {side: (best[side, n2] - best[side, n1]) / (n2 - n1) for side in SIDES}
    unit, k = ("ms", 1e3) if per["diffusers"] < 1 else ("s", 1)
    tag = f"{case.label}, {case.size}x{case.size}"
    executed = sorted({s for side in second for _, rep in second[side] for s in rep.executed})
    t_second = {side: min(t for t, _ in second[side]) for side in second}
    _, rep = min(second["ours"], key=lambda p: p[0])
    nodes = ", ".join(f"{s} {v * 1e3:.1f}" for s, v in sorted(rep.seconds.items(), key=lambda kv: -kv[1]))
    engine_s = t_second["ours"] - sum(rep.seconds.values())
    slowest = sorted(first.report.seconds.items(), key=lambda kv: -kv[1])[:3]
    theirs_n1 = best["diffusers", n1]
    return [
        (f"{tag}: per step ({n1} vs {n2} steps, min of {case.repeats})",
         f"ours {per['ours'] * k:.2f} {unit}, diffusers {per['diffusers'] * k:.2f} {unit}, "
         f"ratio {per['ours'] / per['diffusers']:.3f}x"),
        (f"{tag}: per step, ours synchronous (max_workers=1)",
         f"{per['ours sync'] * k:.2f} {unit}, ratio {per['ours sync'] / per['diffusers']:.3f}x"),
        (f"{tag}: images agree", f"max abs diff {diff:.1e} over {1 + 2 * case.repeats} seeds (image std {std:.3f})"),
        (f"{tag}: load + first call ({n1} steps)",
         f"ours {t_first:.2f} s (slowest nodes: {', '.join(f'{s} {v:.2f}' for s, v in slowest)}), "
         f"diffusers {t_load + t_theirs:.2f} s (from_pretrained {t_load:.2f})"),
        (f"{tag}: second call, new seed ({n1} steps)",
         f"ours {t_second['ours'] * k:.1f} {unit} (sync {t_second['ours sync'] * k:.1f}), diffusers "
         f"{theirs_n1 * k:.1f} {unit}, speed-up {theirs_n1 / t_second['ours']:.2f}x "
         f"(sync {theirs_n1 / t_second['ours sync']:.2f}x)"),
        (f"{tag}: ours second call executed (ms)",
         f"{nodes}; engine (validate, plan, dispatch) {engine_s * 1e3:.1f}"
         f"{'' if set(executed) == SEED_ONLY else f'; UNEXPECTED, executed {executed}'}"),
    ]


# -- peak RSS, each in a fresh process -------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: ``VmHWM``, which starts afresh at ``exec``; ``ru_maxrss`` does not (the
    kernel carries the parent's peak over into a child it forks), so it would read the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS: bytes; elsewhere KiB


def rss_child(side: str, case: Case) -> dict:
    """One load + one generation at N1 steps in this (fresh) process."""
    quiet()  # imports diffusers and transformers: both sides use their classes, so the baseline holds them
    if side == "diffusers":
        base = peak_rss_mib()
        image = run_theirs(load_pipeline(case), case, case.steps[0], seed=0)[1]
    else:
        engine = Engine(device="cpu", model_roots=[case.root])  # imports the node packs
        base = peak_rss_mib()
        name = case.file if side == "ours-file" else case.name
        image = run_ours(engine, case, case.steps[0], seed=0, name=name)[1]
    return {"base": base, "peak": peak_rss_mib(), "std": float(image.std())}


def bench_rss(case: Case, threads: int) -> list[tuple[str, str]]:
    got = {}
    for side in ("ours", "ours-file", "diffusers"):
        cmd = [sys.executable, __file__, "--rss", side, "--family", case.family, "--root", str(case.root),
               "--name", case.name, "--size", str(case.size), "--steps", str(case.steps[0]), "--threads", str(threads)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"RSS child {side} failed:\n{done.stderr[-3000:]}")
        got[side] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"{case.label}: RSS {side} {got[side]['peak']:.0f} MiB ({time.perf_counter() - t0:.1f} s)")
    tag = f"{case.label}, {case.size}x{case.size}"

    def share(side: str) -> str:
        g = got[side]
        return f"{g['peak']:.0f} MiB (after imports {g['base']:.0f}, +{g['peak'] - g['base']:.0f})"

    theirs = got["diffusers"]["peak"]
    return [(f"{tag}: peak RSS, load + 1 call ({case.steps[0]} steps)",
             f"ours {share('ours')}, diffusers {share('diffusers')}, ratio {got['ours']['peak'] / theirs:.3f}x"),
            (f"{tag}: peak RSS, ours from the single file",
             f"{share('ours-file')}, ratio to diffusers {got['ours-file']['peak'] / theirs:.3f}x")]


# -- checkpoints -----------------------------------------------------------------------------------------------


def tiny_cases(root: Path, repeats: int) -> list[Case]:
    from tests.nodes.sd_fixtures import build

    labels = {"sd1": "tiny SD1.x", "sd2": "tiny SD2.x (v)", "sdxl": "tiny SDXL"}
    for family in labels:
        build(family, root)  # the returned reference pipeline is not used: ours and theirs both load from disk
    return [Case(labels[f], f, root, f, 64, (4, 12), repeats) for f in labels]


def build_real(root: Path) -> None:
    """Random weights in the SD1.5 architecture, as ``root/diffusers/NAME`` and ``root/checkpoints/NAME.safetensors``
    (unless already there)."""
    folder, file = root / "diffusers" / REAL_NAME, root / "checkpoints" / f"{REAL_NAME}.safetensors"
    if (folder / "model_index.json").is_file() and file.is_file():
        log(f"real size: reusing {folder}")
        return
    import diffusers
    import transformers
    from safetensors.torch import save_file

    from nodes.checkpoints.families import scheduler_config
    from nodes.checkpoints.keymaps import unet_map, vae_map
    from tests.nodes.sd_fixtures import clip_tokenizer, hf_names, layout, original, tokenizer_files

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407)).eval()
    params = sum(p.numel() for p in unet.parameters())
    log(f"real size: built U-Net ({params / 1e6:.0f}M parameters), VAE, CLIP-L in {time.perf_counter() - t0:.1f} s")
    tokenizer_files(folder / "tokenizer", "<|endoftext|>")
    scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler_config("sd1"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(folder / "tokenizer"),
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config("sd1")))
    state = original(unet.state_dict(), unet_map(layout(unet)), "model.diffusion_model.")
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in hf_names(text.state_dict()).items()})
    state.update(original(vae.state_dict(), vae_map(4, 2), "first_stage_model."))
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file))
    log(f"real size: folder and single file written in {time.perf_counter() - t0:.1f} s")


# -- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the tiny rows only")
    mode.add_argument("--real", action="store_true", help="also the real SD1.5-size row (the default)")
    ap.add_argument("--repeats", type=int, default=3, help="calls per step count, tiny rows")
    ap.add_argument("--real-repeats", type=int, default=1, help="calls per step count, real-size row")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache", type=Path, help="keep the real-size checkpoint in this folder and reuse it")
    ap.add_argument("--rss", choices=("ours", "ours-file", "diffusers"), help=argparse.SUPPRESS)
    for flag, kind in (("--family", str), ("--root", Path), ("--name", str), ("--size", int), ("--steps", int)):
        ap.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss:
        case = Case(args.name, args.family, args.root, args.name, args.size, (args.steps, args.steps), 1)
        print(json.dumps(rss_child(args.rss, case)))
        return 0
    quiet()
    threads = torch.get_num_threads()
    rows: list[tuple[str, str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_diffusers-") as tmp:
        t0 = time.perf_counter()
        cases = tiny_cases(Path(tmp) / "tiny", args.repeats)
        log(f"tiny checkpoints built in {time.perf_counter() - t0:.1f} s")
        if not args.quick:
            real_root = args.cache or Path(tmp) / "real"
            build_real(real_root)
            cases.append(Case("SD1.5 size (random weights)", "sd1", real_root, REAL_NAME, 512, (2, 3),
                               args.real_repeats))
        for case in cases:
            t0 = time.perf_counter()
            rows.extend(bench_case(case))
            t1 = time.perf_counter()
            rows.extend(bench_rss(case, threads))
            log(f"{case.label}: timing {t1 - t0:.1f} s, RSS {time.perf_counter() - t1:.1f} s")
    print_table(rows, f"torch {torch.__version__}, threads={threads}, python {sys.version.split()[0]}, "
                      f"whole run {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
