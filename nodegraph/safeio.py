"""Reading and writing files that someone you don't trust may have planted (POSIX).

The engine writes into folders a graph's author or another user can also write to (``--out``, the output root,
the disk cache) and reads files it did not make (``image.load`` inputs, cache entries). Policy:

* **Writes** (:func:`write_bytes`) go to a fresh temporary ``.tmp-<pid>-<random>`` created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` in the target's own folder, then ``os.replace`` onto the final name, so a
  reader never sees half a file and a link planted at the final name is replaced itself, never written through.
  The folders below the root are walked one at a time with ``O_NOFOLLOW`` relative to the folder above
  (``dir_fd``), so a link anywhere on the way is refused (``UnsafeFileError``) rather than followed outside the
  root, even if it appears between a check and the write. The root itself is the caller's choice and is trusted.
  The relative path must be plain: no absolute path, no ``..``, ``.`` or empty component.
* **Reads** (:func:`read_bytes`) accept only regular files no larger than a bound given by the caller: the file
  is checked with ``stat`` before opening (so no FIFO or device is ever opened), opened with
  ``O_NONBLOCK`` (and ``O_NOFOLLOW`` when links are not wanted), checked again with ``fstat`` on the open file,
  and exactly the size ``fstat`` reported is read. A FIFO, a device, a folder or a link (when refused) raises
  ``UnsafeFileError`` naming the path; it never blocks.
* **Temporaries** left by a killed process are recognised by name: :func:`remove_stale_temps` deletes those
  whose pid is not alive on this machine or that are older than ``max_age_s``.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path, PurePath

TEMP_PREFIX = ".tmp-"
STALE_TEMP_AGE_S = 3600.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class UnsafeFileError(OSError):
    """A file or folder the engine refuses to touch: not a regular file, a link, or over a size bound."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def plain_name(name: str) -> str:
    """``name`` if it is one plain file name (no folder part); otherwise ValueError saying why."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or "/" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain file name (no '/', '\\', '..', NUL or empty names)")
    return name


def relative_parts(relative: str | PurePath) -> tuple[str, ...]:
    """The components of a relative path, refusing absolute paths and ``..``/``.``/empty components."""
    text = str(relative)
    if not text or text.startswith(("/", "\\")) or PurePath(text).is_absolute():
        raise ValueError(f"{text!r} is not a relative path")
    parts = tuple(text.split("/"))
    for part in parts:
        plain_name(part)
    return parts


def temp_name() -> str:
    """A fresh temporary name, ``.tmp-<pid>-<random>`` (see :func:`remove_stale_temps`)."""
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def _open_subdir(parent_fd: int, name: str, shown: Path, create: bool) -> int:
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        try:
            kind = _kind(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            raise exc from None
        raise UnsafeFileError(f"{str(shown)!r} is {kind}, not a folder; refusing to write through it") from None


def write_bytes(root: str | Path, relative: str | PurePath, data: bytes, *, mode: int = 0o666,
                make_dirs: bool = True) -> Path:
    """Write ``data`` atomically to ``root / relative`` without following any link below ``root``.

    Missing folders below ``root`` (and ``root`` itself) are created when ``make_dirs``. Returns
    ``root / relative``. Raises ValueError for a path that is not plain, :class:`UnsafeFileError` for a link or
    non-folder on the way, OSError for anything else (the final name being a folder, a full disk).
    """
    root = Path(root)
    parts = relative_parts(relative)
    if make_dirs:
        root.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(root, _DIR_FLAGS)
    try:
        shown = root
        for part in parts[:-1]:
            shown = shown / part
            sub = _open_subdir(dir_fd, part, shown, make_dirs)
            os.close(dir_fd)
            dir_fd = sub
        tmp = temp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(dir_fd)
    return root.joinpath(*parts)


def _check_regular(path: str | Path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{str(path)!r} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    if st.st_size > max_bytes:
        raise UnsafeFileError(f"{str(path)!r} is {st.st_size} bytes, over the {max_bytes}-byte limit for this read")


def read_bytes(path: str | Path, max_bytes: int, *, follow_links: bool = True) -> bytes:
    """The contents of a regular file of at most ``max_bytes`` bytes; never blocks on a FIFO or a device.

    With ``follow_links=False`` the last component must not be a link. Raises :class:`UnsafeFileError` for a
    file that is not regular, a refused link or a file over the bound; FileNotFoundError and other OSErrors as
    the system gives them (they name the path).
    """
    _check_regular(path, os.stat(path, follow_symlinks=follow_links), max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        _check_regular(path, st, max_bytes)  # what was opened, in case the name changed since the stat
        chunks, left = [], st.st_size
        while left > 0:
            chunk = fh.read(left)
            if not chunk:
                break  # truncated meanwhile: the caller's parser sees a short file
            chunks.append(chunk)
            left -= len(chunk)
    return b"".join(chunks)


def _temp_pid(name: str) -> int | None:
    pid, _, rest = name[len(TEMP_PREFIX):].partition("-")
    return int(pid) if pid.isdigit() and int(pid) > 0 and rest else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temps(folder: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Delete ``.tmp-*`` files in ``folder`` whose writer is gone or that are older than ``max_age_s``.

    A name without a pid (an older format) is removed on age alone. Files vanishing meanwhile are fine.
    Returns how many were removed.
    """
    removed, now = 0, time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                continue
            pid = _temp_pid(name)
            if now - st.st_mtime > max_age_s or (pid is not None and not _pid_alive(pid)):
                os.unlink(path)
                removed += 1
        except OSError:
            continue
    return removed
