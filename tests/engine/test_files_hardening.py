"""Files planted by someone you don't trust: names escaping ``--out``, links, FIFOs, /dev/zero, orphaned
temporaries, and the disk cache's byte budget. Every case uses real links and FIFOs on the file system.

A read that could hang runs through :func:`bounded` (a daemon thread joined with a timeout), so a regression
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import nodegraph
import nodes.core
from nodegraph import NodeExecutionError
from nodegraph import types as T
from nodegraph.cache import MISSING, Cache, DiskCache
from nodegraph.limits import Limits
from nodegraph.outputs import PNG_GRAPH_KEY, write_outputs
from nodegraph.safeio import UnsafeFileError, read_bytes, remove_stale_temps, temp_name, write_bytes

from . import exec_nodes as ex
from .exec_nodes import L, graph

node_module = importlib.import_module("nodegraph.node")  # the module (``nodegraph.node`` is also the decorator)
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")


def bounded(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` in a daemon thread; fail (not hang) if it has not returned or raised within ``timeout``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file below root with its bytes (links as their targets), to prove nothing changed."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = "<special>"
    return out


IMAGE = torch.linspace(0, 1, 3 * 4 * 5).view(1, 3, 4, 5)


# -- the output writer: names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "../x", "/abs/x", "a/b", "..", ".", "", "sub\\x", "nul\0"])
def test_write_outputs_refuses_names_that_are_not_plain_and_writes_nothing(tmp_path, name):
    out = tmp_path / "deep" / "out"
    before = tree(tmp_path)
    values = {"good": 1.0, name: IMAGE}  # a good name first: nothing is written before the check
    with pytest.raises(ValueError, match="not a plain file name"):
        write_outputs(values, {"good": T.Float, name: T.Image}, out, "{}")
    assert tree(tmp_path) == before
    assert not Path("/abs/x.png").exists()


def test_write_outputs_keeps_its_files_and_paths(tmp_path):
    out = tmp_path / "out"
    files = write_outputs({"image": IMAGE, "batch": IMAGE.repeat(2, 1, 1, 1), "t": torch.arange(3.0), "n": 2.5,
                           "model": torch.nn.Linear(1, 1), "f": "/somewhere/made.ply"},
                          {"image": T.Image, "batch": T.Image, "t": T.Tensor, "n": T.Float, "model": T.Any,
                           "f": T.File}, out, '{"version": 1}')
    assert files == {"image": [str(out / "image.png")], "batch": [str(out / "batch_0.png"), str(out / "batch_1.png")],
                     "t": [str(out / "t.safetensors")], "n": [str(out / "n.json")], "model": [],
                     "f": ["/somewhere/made.ply"]}
    with Image.open(out / "image.png") as im:
        assert im.text[PNG_GRAPH_KEY] == '{"version": 1}' and im.size == (5, 4)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "t.safetensors"))["t"], torch.arange(3.0))
    assert json.loads((out / "n.json").read_text()) == 2.5
    assert sorted(p.name for p in out.iterdir()) == ["batch_0.png", "batch_1.png", "image.png", "n.json",
                                                     "t.safetensors"]  # no temporaries left


# -- the output writer: links -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,file_name", [("Image", "o.png"), ("Tensor", "o.safetensors"), ("Float", "o.json")])
def test_a_link_planted_in_out_is_replaced_not_written_through(tmp_path, kind, file_name):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_bytes(b"precious")
    (out / file_name).symlink_to(victim)
    value = {"Image": IMAGE, "Tensor": torch.ones(2), "Float": 1.0}[kind]
    [written] = write_outputs({"o": value}, {"o": getattr(T, kind)}, out, "{}")["o"]
    assert written == str(out / file_name)
    assert victim.read_bytes() == b"precious"
    assert not (out / file_name).is_symlink() and (out / file_name).is_file()
    assert (out / file_name).stat().st_size > 0


def test_a_dangling_link_in_out_does_not_create_its_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere" / "created.json"
    (tmp_path / "elsewhere").mkdir()
    (out / "n.json").symlink_to(target)
    write_outputs({"n": 3}, {"n": T.Int}, out)
    assert not target.exists()
    assert not (out / "n.json").is_symlink() and json.loads((out / "n.json").read_text()) == 3


@pytest.mark.parametrize("leads", ["outside", "inside"])
def test_write_bytes_refuses_a_linked_folder_on_the_way(tmp_path, leads):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "sub").symlink_to(outside if leads == "outside" else root / "real")
    before = tree(tmp_path)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        write_bytes(root, "sub/x.png", b"data")
    assert tree(tmp_path) == before


def test_write_bytes_makes_folders_and_refuses_escapes(tmp_path):
    assert write_bytes(tmp_path / "r", "a/b/c.bin", b"123") == tmp_path / "r" / "a" / "b" / "c.bin"
    assert (tmp_path / "r" / "a" / "b" / "c.bin").read_bytes() == b"123"
    for bad in ("../x", "a/../../x", str(tmp_path / "abs"), "a//b", "a/./b"):
        with pytest.raises(ValueError):
            write_bytes(tmp_path / "r", bad, b"x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


def test_a_failed_write_leaves_no_temporary(tmp_path):
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        write_bytes(tmp_path, "taken", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_temporaries_are_named_with_the_pid():
    name = temp_name()
    prefix, pid, rand = name.split("-")
    assert prefix == ".tmp" and int(pid) == os.getpid() and len(rand) == 16 and temp_name() != name


# -- image.save / image.load ------------------------------------------------------------------------------


@pytest.fixture
def core_engine(tmp_path) -> nodegraph.Engine:
    reg = nodegraph.Registry()
    reg.add_module(nodes.core, "builtin")
    (tmp_path / "in").mkdir()
    return nodegraph.Engine(reg, device="cpu", input_root=tmp_path / "in", output_root=tmp_path / "out")


def save_graph(path: str) -> dict:
    return graph({"g": {"type": "image.gradient", "inputs": {"width": 8, "height": 6}},
                  "save": {"type": "image.save", "inputs": {"image": L("g", "image"), "path": path}}},
                 {"file": L("save", "file")})


def load_graph(path: str) -> dict:
    return graph({"load": {"type": "image.load", "inputs": {"path": path}}}, {"image": L("load", "image")})


def test_image_save_replaces_a_planted_link_to_inside_the_root(core_engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "real.png").write_bytes(b"keep me")
    (out / "alias.png").symlink_to(out / "real.png")  # confine resolves it to real.png, which is rewritten
    written = Path(core_engine.run(save_graph("made.png")).outputs["file"])
    assert written == out.resolve() / "made.png" and written.is_file()
    assert (out / "real.png").read_bytes() == b"keep me"


def test_image_save_does_not_follow_a_folder_swapped_for_a_link_after_the_check(core_engine, tmp_path,
                                                                                 monkeypatch):
    """The race confine cannot see: ``sub`` is a folder when checked and a link outside when written."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    outside.mkdir()
    real_confine = node_module.confine

    def confine_then_swap(root, path, kind):
        full = real_confine(root, path, kind)
        if kind == "output":
            (out / "sub").rmdir()
            (out / "sub").symlink_to(outside)
        return full

    monkeypatch.setattr(node_module, "confine", confine_then_swap)
    with pytest.raises(NodeExecutionError) as err:
        core_engine.run(save_graph("sub/x.png"))
    assert isinstance(err.value.error, UnsafeFileError) and "symbolic link" in str(err.value.error)
    assert list(outside.iterdir()) == []


def test_image_load_of_a_fifo_fails_naming_the_path_without_hanging(core_engine, tmp_path):
    fifo = tmp_path / "in" / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(NodeExecutionError) as err:
        bounded(lambda: core_engine.run(load_graph("pipe.png")))  # the fingerprint reads it too, at planning
    assert (err.value.node, err.value.node_type) == ("load", "image.load")
    assert isinstance(err.value.error, UnsafeFileError)
    assert "a FIFO" in str(err.value) and str(fifo.resolve()) in str(err.value)


def test_image_load_of_a_missing_file_names_it(core_engine, tmp_path):
    with pytest.raises(NodeExecutionError) as err:
        core_engine.run(load_graph("nope.png"))
    assert isinstance(err.value.error, FileNotFoundError) and "nope.png" in str(err.value)


def test_image_load_of_an_oversized_file_is_refused(core_engine, tmp_path, monkeypatch):
    core_engine.run(save_graph("made.png"))
    (tmp_path / "out" / "made.png").rename(tmp_path / "in" / "big.png")
    assert core_engine.run(load_graph("big.png")).outputs["image"].shape == (1, 3, 6, 8)  # control
    monkeypatch.setattr(nodes.core, "IMAGE_FILE_MAX_BYTES", 16)
    with pytest.raises(NodeExecutionError) as err:
        core_engine.run(load_graph("big.png"), overrides={"load.mode": "L"})
    assert isinstance(err.value.error, UnsafeFileError) and "over the 16-byte limit" in str(err.value)


def test_image_load_of_not_an_image_names_the_path(core_engine, tmp_path):
    (tmp_path / "in" / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(NodeExecutionError) as err:
        core_engine.run(load_graph("junk.png"))
    assert "junk.png" in str(err.value) and "not an image" in str(err.value)


def test_the_decompression_bomb_guard_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2 ** 28


# -- the reader ------------------------------------------------------------------------------------------


def test_read_bytes_refuses_fifos_and_devices_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to("/dev/zero")
    for path, follow, kind in [(fifo, True, "a FIFO"), (fifo, False, "a FIFO"),
                               (tmp_path / "zero", True, "a character device"),
                               (tmp_path / "zero", False, "a symbolic link"), (tmp_path, True, "a folder")]:
        with pytest.raises(UnsafeFileError, match=kind):
            bounded(lambda: read_bytes(path, 1 << 40, follow_links=follow))


def test_read_bytes_reads_exactly_a_bounded_regular_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert read_bytes(tmp_path / "f", 100) == b"x" * 100
    assert read_bytes(tmp_path / "link", 100) == b"x" * 100  # links are followed unless refused
    with pytest.raises(UnsafeFileError, match="over the 99-byte limit"):
        read_bytes(tmp_path / "f", 99)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        read_bytes(tmp_path / "link", 100, follow_links=False)
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "missing", 100)


# -- the disk cache: odd entries are misses -------------------------------------------------------------------


def plant(path: Path, how: str, tmp_path: Path) -> None:
    """Replace a cache entry by something odd."""
    good = path.read_bytes()
    path.unlink()
    if how == "dev_zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "link_to_valid":  # a valid entry, but outside the folder: links are never followed
        (tmp_path / "valid").write_bytes(good)
        path.symlink_to(tmp_path / "valid")
    elif how == "folder":
        path.mkdir()


@pytest.mark.parametrize("how", ["dev_zero", "fifo", "link_to_valid", "folder"])
@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
def test_an_odd_disk_entry_is_a_miss(tmp_path, how, suffix):
    cache = tmp_path / "cache"
    disk = DiskCache(cache)
    value = {"out": torch.arange(6.0)} if suffix == ".safetensors" else {"out": 3.0}
    assert disk.put("k", value)
    path = cache / f"k{suffix}"
    plant(path, how, tmp_path)
    assert bounded(lambda: DiskCache(cache).get("k"), timeout=10) is MISSING
    assert "k" not in DiskCache(cache)
    if how != "folder":
        assert DiskCache(cache).put("k", value)  # the rerun's write replaces the odd entry itself
        assert stat.S_ISREG(os.lstat(path).st_mode)
        back = DiskCache(cache).get("k")
        assert back.keys() == {"out"} and (torch.equal(back["out"], value["out"]) if suffix == ".safetensors"
                                           else back["out"] == 3.0)


@pytest.mark.parametrize("how", ["dev_zero", "fifo"])
@pytest.mark.parametrize("target", ["s", "n"])
def test_an_engine_reruns_and_rewrites_an_odd_entry(reg, tmp_path, how, target):
    g = graph({"t": {"type": "ex.tensor", "inputs": {"shape": [2, 3], "value": 1.5}},
               "s": {"type": "ex.scale", "inputs": {"x": L("t"), "factor": 2.0}},
               "n": {"type": "ex.num", "inputs": {"value": 3.0}}}, {"s": L("s"), "n": L("n")})
    cache = tmp_path / "cache"
    first = nodegraph.Engine(reg, device="cpu", cache_dir=cache).run(g)
    key = first.plan.steps[target].key
    [path] = [p for p in cache.iterdir() if p.name.startswith(key)]
    plant(path, how, tmp_path)
    ex.reset()
    res = bounded(lambda: nodegraph.Engine(reg, device="cpu", cache_dir=cache).run(g))
    assert res.report.executed == [target]
    assert res.outputs["n"] == 3.0 and torch.equal(res.outputs["s"], torch.full((2, 3), 3.0))
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert nodegraph.Engine(reg, device="cpu", cache_dir=cache).run(g).report.executed == []


def test_an_entry_over_the_read_limit_is_a_miss_and_not_written(tmp_path):
    disk = DiskCache(tmp_path)
    assert disk.put("big", {"out": torch.zeros(100)})
    small = DiskCache(tmp_path, limits=Limits(max_cache_entry_bytes=200))
    assert small.max_entry_bytes == 200
    assert small.get("big") is MISSING
    assert small.put("big2", {"out": torch.zeros(100)}) is False and not list(tmp_path.glob("big2*"))
    assert DiskCache(tmp_path).max_entry_bytes == Limits().max_cache_entry_bytes


# -- the disk cache: orphaned temporaries ----------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_opening_a_cache_folder_removes_orphaned_temporaries(tmp_path):
    hour_ago = time.time() - 3700
    dead = dead_pid()
    names = {"dead": f".tmp-{dead}-0123abcd", "alive": f".tmp-{os.getpid()}-0123abcd",
             "alive_old": f".tmp-{os.getpid()}-4567ef01", "legacy_new": ".tmp-k3j4h5", "legacy_old": ".tmp-q9w8e7",
             "entry": "abc.msgpack"}
    for label, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if label.endswith("_old"):
            os.utime(tmp_path / name, (hour_ago, hour_ago))
    (tmp_path / f".tmp-{dead}-link").symlink_to("/dev/zero")  # a link is removed itself, never its target
    DiskCache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["legacy_new"], "abc.msgpack"])
    assert os.path.exists("/dev/zero")


def test_a_temporary_left_by_a_killed_writer_is_removed(tmp_path):
    """A real kill -9 mid-write: the child creates its temporary, signals, and is killed."""
    script = ("import sys, time\n"
              "from nodegraph.safeio import temp_name\n"
              "p = sys.argv[1] + '/' + temp_name()\n"
              "open(p, 'wb').write(b'half')\n"
              "print(p, flush=True)\n"
              "time.sleep(60)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=root)
    orphan = Path(proc.stdout.readline().strip())
    assert orphan.exists()
    DiskCache(tmp_path)
    assert orphan.exists()  # its writer is still alive
    proc.kill()
    proc.wait()
    proc.stdout.close()
    DiskCache(tmp_path)  # the next open of the folder removes it
    assert not orphan.exists()
    assert remove_stale_temps(tmp_path) == 0


# -- the disk cache: byte budget ----------------------------------------------------------------------------


def entry(n: int) -> dict:
    return {"out": torch.zeros(n)}


def entry_size(tmp_path: Path) -> int:
    probe = DiskCache(tmp_path / "probe")
    probe.put("k", entry(64))
    return probe.bytes_used


def test_disk_lru_evicts_the_least_recently_used(tmp_path):
    size = entry_size(tmp_path)
    disk = DiskCache(tmp_path / "c", budget_bytes=int(2.5 * size))
    assert disk.put("k1", entry(64)) and disk.put("k2", entry(64))
    assert disk.get("k1") is not MISSING  # k1 is now more recent than k2
    assert disk.put("k3", entry(64))
    assert "k2" not in disk and "k1" in disk and "k3" in disk
    assert disk.evictions == 1 and disk.bytes_used == 2 * size <= disk.budget_bytes
    assert disk.put("k4", entry(64))  # now k1 is the oldest
    assert "k1" not in disk and {"k3", "k4"} <= {p.stem for p in (tmp_path / "c").iterdir()}


def test_a_hit_refreshes_the_mtime(tmp_path):
    disk = DiskCache(tmp_path)
    disk.put("k", entry(4))
    path = tmp_path / "k.safetensors"
    os.utime(path, (1_000_000, 1_000_000))
    assert disk.get("k") is not MISSING
    assert path.stat().st_mtime > time.time() - 60


def test_an_entry_larger_than_the_disk_budget_is_not_written(tmp_path):
    size = entry_size(tmp_path)
    disk = DiskCache(tmp_path / "c", budget_bytes=size * 3)
    assert disk.put("small", entry(64))
    assert disk.put("huge", entry(64 * 4)) is False
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["small.safetensors"]


def test_eviction_tolerates_entries_vanishing_meanwhile(tmp_path, monkeypatch):
    size = entry_size(tmp_path)
    folder = tmp_path / "c"
    a = DiskCache(folder, budget_bytes=2 * size)
    a.put("k1", entry(64))
    a.put("k2", entry(64))
    stale = a.entries()
    for _, _, path in stale:
        path.unlink()  # another process evicts both after this one listed them
    real_entries = DiskCache.entries
    monkeypatch.setattr(DiskCache, "entries", lambda self: sorted(stale + real_entries(self)))
    assert a.put("k3", entry(64))  # over budget by the stale listing: the vanished files are skipped
    assert a.evictions == 0 and "k3" in a and a.get("k3") is not MISSING


def test_two_processes_sharing_a_budgeted_folder_stay_under_it(tmp_path):
    size = entry_size(tmp_path)
    folder, budget = tmp_path / "c", 3 * size
    script = ("import sys, torch\n"
              "from nodegraph.cache import DiskCache\n"
              "d = DiskCache(sys.argv[1], budget_bytes=int(sys.argv[2]))\n"
              "for i in range(40):\n"
              "    assert d.put(f'{sys.argv[3]}{i}', {'out': torch.zeros(64)})\n")
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(budget), tag], cwd=root)
             for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert DiskCache(folder).bytes_used <= budget
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_cache_passes_the_disk_budget_and_limits_on(tmp_path):
    size = entry_size(tmp_path)
    cache = Cache(1 << 20, tmp_path / "c", disk_budget=2 * size, limits=Limits(max_cache_entry_bytes=10 * size))
    assert cache.disk.budget_bytes == 2 * size and cache.disk.max_entry_bytes == 10 * size
    for key in ("k1", "k2", "k3"):
        cache.put(key, entry(64))
    assert cache.disk.bytes_used <= 2 * size and "k1" not in cache.disk
    fresh = Cache(cache_dir=tmp_path / "c")
    assert fresh.disk.budget_bytes is None
    assert fresh.get("k3")[1] == "disk" and fresh.get("k1") == (MISSING, "")
