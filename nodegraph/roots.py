"""Model roots: where model names resolve, in ComfyUI's folder layout.

A model root is a folder laid out as ComfyUI's ``models/`` folder is, so a user can point the engine at the one
they already have::

    ROOT/checkpoints/        single-file checkpoints (*.safetensors)
    ROOT/diffusers/          diffusers pipeline folders (model_index.json + unet/ vae/ ...)
    ROOT/diffusion_models/   denoisers alone (ComfyUI's older name: unet/)
    ROOT/text_encoders/      text encoders (older name: clip/)
    ROOT/vae/  ROOT/loras/  ROOT/controlnet/  ROOT/embeddings/  ROOT/upscale_models/

Roots come from the CLI's ``--models DIR`` (repeatable), the ``NODEGRAPH_MODELS`` environment variable
(``os.pathsep``-separated) and the API's ``Engine(model_roots=...)``; node packs may add their own (the built-in
pack adds its shipped weights). Earlier roots win when two hold the same name.

Policy: a graph names a model, never a path. A name is a relative path inside one folder of a root
(``sd15.safetensors``, ``sdxl/base.safetensors``; ``\\`` is read as ``/``): absolute paths, ``~``, ``..``
components, empty parts and control characters are refused before any file is touched, so a graph cannot
make the engine read outside its roots. Symbolic links *inside* a root are followed (they were put there by
whoever owns the root, as ComfyUI users do to keep models on another disk). An unknown name is an error that
lists what that folder holds in each root. The embedding API may allow plain paths explicitly
(``ModelRoots(..., allow_paths=True)``); the CLI never does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

MODELS_ENV = "NODEGRAPH_MODELS"

MODEL_FOLDERS: dict[str, tuple[str, ...]] = {  # folder -> the folder names that hold it, newest name first
    "checkpoints": ("checkpoints",),
    "diffusers": ("diffusers",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "embeddings": ("embeddings",),
    "upscale_models": ("upscale_models",),
}


class ModelNotFound(LookupError):
    """A model name that no root holds, or that is not a plain name. Carries a code and a hint for reports."""

    def __init__(self, message: str, code: str = "unknown_model", hint: str | None = None):
        super().__init__(message)
        self.code, self.hint = code, hint


def check_name(name: str) -> str:
    """Normalise a model name (``\\`` -> ``/``) and refuse anything that is not a plain relative name."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound(f"a model name must be a non-empty string, got {name!r}", code="bad_model_name")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ModelNotFound(f"model name {name!r} contains control characters", code="bad_model_name")
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith(("/", "~")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise ModelNotFound(f"model name {name!r} is a path; name a model inside a model root instead",
                            code="bad_model_name", hint="give --models DIR and a name relative to one of its folders")
    if any(p in ("", ".", "..") for p in parts):
        raise ModelNotFound(f"model name {name!r} has an empty, '.' or '..' part", code="bad_model_name")
    return norm


@dataclass(frozen=True)
class ModelRoots:
    """An ordered list of model roots (see the module docstring)."""

    roots: tuple[Path, ...] = ()
    allow_paths: bool = False
    extra: dict[str, tuple[Path, ...]] = field(default_factory=dict)  # folder -> pack-provided folders

    @classmethod
    def from_env(cls, roots: Iterable[str | Path] = (), *, allow_paths: bool = False,
                 environ: dict[str, str] | None = None) -> "ModelRoots":
        env = (os.environ if environ is None else environ).get(MODELS_ENV, "")
        found = [Path(p).expanduser() for p in [*roots, *[e for e in env.split(os.pathsep) if e]]]
        return cls(tuple(dict.fromkeys(p.resolve() for p in found)), allow_paths)

    def with_folder(self, folder: str, path: str | Path) -> "ModelRoots":
        """A copy where ``folder`` (e.g. ``diffusion_models``) also looks in ``path`` (after the roots)."""
        extra = dict(self.extra)
        extra[folder] = (*extra.get(folder, ()), Path(path).resolve())
        return ModelRoots(self.roots, self.allow_paths, extra)

    def folders(self, folder: str) -> list[Path]:
        """Every existing folder that holds models of kind ``folder``, in lookup order."""
        if folder not in MODEL_FOLDERS:
            raise ValueError(f"unknown model folder {folder!r}; known: {sorted(MODEL_FOLDERS)}")
        out = [root / name for root in self.roots for name in MODEL_FOLDERS[folder]]
        out += list(self.extra.get(folder, ()))
        return [p for p in out if p.is_dir()]

    def resolve(self, name: str, folder: str, *, want: str = "any") -> Path:
        """The file or folder ``name`` inside ``folder`` of the first root that has it.

        ``want`` is ``"file"``, ``"dir"`` or ``"any"``. Raises :class:`ModelNotFound` listing what is there.
        """
        if self.allow_paths and isinstance(name, str) and Path(name).expanduser().is_absolute():
            path = Path(name).expanduser()
            if _kind_ok(path, want):
                return path
            raise ModelNotFound(f"{name!r} is not an existing {'folder' if want == 'dir' else 'file'}")
        norm = check_name(name)
        for base in self.folders(folder):
            path = base / norm
            if _kind_ok(path, want):
                return path
        raise ModelNotFound(f"no model {name!r} in {folder}/ of the model roots", hint=self.describe(folder, want))

    def names(self, folder: str, want: str = "any", limit: int = 200) -> list[str]:
        """Names available in ``folder`` (files and folders, one level below plus one subfolder level)."""
        seen: list[str] = []
        for base in self.folders(folder):
            for path in sorted(base.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.is_dir() and want != "file" and not _looks_grouping(path):
                    seen.append(path.name)
                elif path.is_dir():
                    seen.extend(f"{path.name}/{p.name}" for p in sorted(path.iterdir())
                                if not p.name.startswith(".") and _kind_ok(p, want))
                elif want != "dir":
                    seen.append(path.name)
                if len(seen) >= limit:
                    return list(dict.fromkeys(seen))[:limit]
        return list(dict.fromkeys(seen))

    def describe(self, folder: str, want: str = "any") -> str:
        """What each root holds in ``folder`` (``want``: ``"file"``, ``"dir"`` or ``"any"``), for error hints."""
        if not self.roots and not self.extra.get(folder):
            return f"no model roots are configured: pass --models DIR (a folder with {folder}/ inside) or set {MODELS_ENV}"
        parts = []
        for root in self.roots:
            here = [p for p in (root / n for n in MODEL_FOLDERS[folder]) if p.is_dir()]
            names = ModelRoots((root,)).names(folder, want, limit=20) if here else []
            parts.append(f"{root}/{folder}: {', '.join(names) if names else '(empty or missing)'}")
        for path in self.extra.get(folder, ()):
            names = ModelRoots((), extra={folder: (path,)}).names(folder, want, limit=20)
            parts.append(f"{path}: {', '.join(names) if names else '(empty)'}")
        return "; ".join(parts)


def _kind_ok(path: Path, want: str) -> bool:
    if want == "file":
        return path.is_file()
    if want == "dir":
        return path.is_dir()
    return path.exists()


def _looks_grouping(path: Path) -> bool:
    """A subfolder that groups models (``sdxl/base.safetensors``) rather than being one (a diffusers folder)."""
    markers = ("model_index.json", "config.json")
    return not any((path / m).exists() for m in markers)
