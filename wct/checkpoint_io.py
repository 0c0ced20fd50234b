"""Atomic folder writes, checksummed folders and safetensors header checks: the one place
checkpoints are put on (and first read from) disk.

Floor 1 (standard library only): the embedded-model cache (:mod:`wct.models`), the memory
estimates (:mod:`wct.resources`) and every writer in :mod:`wct.integrations` share it.

Why a module of its own: a checkpoint, an adapter or a merged model is several files, and
three writers (wct checkpoints, PEFT adapters, OutlierTune folders) must give the same two
guarantees.

* **Nothing is lost.**  Everything is written into a temporary sibling folder (same
  filesystem, so a rename is atomic), fsynced, then put in place.  Replacing an existing
  folder uses Linux's ``renameat2(RENAME_EXCHANGE)`` — one atomic swap, so a process
  killed at any instant leaves either the old or the new complete copy at the path.  Where
  that call does not exist the old copy is renamed aside first, and a reader that finds the
  path missing is told where the previous copy is (:func:`interrupted_copy`).
* **Nothing silent.**  The writer records the size and sha256 of every file in
  ``wct_manifest.json``; readers verify it before trusting a byte.  Structural checks
  (headers, shapes, index ranges) catch most damage, but a flipped bit inside a packed
  code or an fp16 value is a *valid* number — only a checksum turns it into an error.
  Hashing costs about 0.3 s per 100 MB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

MANIFEST = "wct_manifest.json"
MANIFEST_FORMAT = "wct-manifest"
MANIFEST_VERSION = 1


class CheckpointIntegrityError(ValueError):
    """A saved folder does not match what was written: truncated, modified, corrupt or incomplete."""


class WCTCheckpointError(ValueError):
    """A wct checkpoint does not match its own ``quantization_config`` (corrupt, truncated or stale)."""


# ---------------------------------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record size + sha256 of every file under ``folder`` (written last, inside the temporary folder)."""
    root = Path(folder)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    out = root / MANIFEST
    out.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}, indent=1) + "\n")
    return out


_VERIFIED: set[tuple] = set()  # folders already hashed in this process, keyed by the stats of their files


def checksums_enabled() -> bool:
    """``WCT_VERIFY_CHECKSUMS=0`` skips hashing on load (structural checks still run)."""
    return os.environ.get("WCT_VERIFY_CHECKSUMS", "1").strip().lower() not in ("0", "false", "no", "off")


def _stat_key(root: Path, names) -> tuple:
    out = [str(root.resolve())]
    for rel in sorted(names):
        with contextlib.suppress(OSError):
            st = (root / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def verify_manifest(folder: str | os.PathLike, required: bool = False) -> bool:
    """Check every file the manifest lists; returns False when there is no manifest (and it is not required).

    Files added after saving (a README, a model card) are ignored; listed files that are
    missing, resized or changed raise :class:`CheckpointIntegrityError` naming the file.
    A folder verified once in this process is not hashed again while its files' sizes,
    mtimes and inodes are unchanged (``load_quantized`` and the transformers quantizer
    both verify).  Disabled by ``WCT_VERIFY_CHECKSUMS=0``.
    """
    root = Path(folder)
    mf = root / MANIFEST
    if not checksums_enabled():
        return False
    if not mf.is_file():
        if required:
            raise CheckpointIntegrityError(f"{root}: {MANIFEST} is missing, so the files cannot be verified")
        return False
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
        files = meta["files"]
        if meta.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a wct manifest")
        version = int(meta.get("version", 0))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointIntegrityError(
            f"{mf}: corrupt manifest ({e}); the folder cannot be verified. Restore it from a good copy, or delete "
            f"{MANIFEST} to load without verification (at your own risk)"
        ) from None
    if version > MANIFEST_VERSION:
        raise CheckpointIntegrityError(f"{mf}: manifest version {version} is newer than this wct ({MANIFEST_VERSION}); upgrade wct")
    for rel, rec in files.items():
        p = root / rel
        try:
            size, _digest = int(rec["size"]), str(rec["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointIntegrityError(f"{mf}: corrupt entry for {rel!r}") from None
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointIntegrityError(f"{mf}: entry {rel!r} points outside the folder")
        if not p.is_file():
            raise CheckpointIntegrityError(f"{p} is missing (listed in {MANIFEST}): the copy is incomplete")
        have = p.stat().st_size
        if have != size:
            raise CheckpointIntegrityError(
                f"{p}: {have} bytes, but {size} were saved (truncated or modified); re-download or re-save it"
            )
    key = _stat_key(root, [*files, MANIFEST])
    if key in _VERIFIED:
        return True
    for rel, rec in files.items():
        p = root / rel
        if file_sha256(p) != str(rec["sha256"]):
            raise CheckpointIntegrityError(
                f"{p} does not match the sha256 recorded in {MANIFEST} when it was saved: the file (or the manifest) "
                "was corrupted or modified; restore it from a good copy or re-save it"
            )
    _VERIFIED.add(key)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# atomic folders
# ---------------------------------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        fn = False
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn
    return _renameat2 or None


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the system cannot."""
    fn = _load_renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: filesystem or kernel without the flag
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace one small file (a benchmark cache, a manifest) so that a kill leaves the old or the new text.

    Hours of benchmark rows live in one JSON file; writing it in place would truncate it first.
    The new file keeps the old one's permissions (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(str(path.parent))


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under ``root`` (a rename is only atomic for data that is on disk)."""
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _normal_permissions(folder: str) -> None:
    """mkdtemp makes a private (0700) folder; a finished checkpoint gets ordinary modes (umask respected)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def swap_into_place(tmp: str, out: str) -> None:
    """Put the finished folder ``tmp`` at ``out``; an existing ``out`` is replaced without a moment of absence."""
    parent = os.path.dirname(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
        os.rename(tmp, out)
    elif exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the previous copy
    else:  # two renames: a kill in between leaves the old copy at ``old`` (see interrupted_copy)
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def check_target(out: str | os.PathLike, overwrite: bool) -> str:
    """Absolute target path, refusing a file or a non-empty folder unless ``overwrite``."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory: choose another path or remove it")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty: pass overwrite=True (CLI: --overwrite) to replace it; the old "
            "copy is kept until the new one is complete"
        )
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False, manifest: bool = True) -> Iterator[str]:
    """``with atomic_folder(path) as tmp: write files into tmp`` — published at ``path`` only if the block succeeds."""
    target = check_target(out, overwrite)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        _normal_permissions(tmp)
        fsync_tree(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[str]:
    """Delete temporary folders that killed saves to ``target`` left behind (their writer's PID is gone).

    The temporary name carries the writer's PID, so a save running concurrently in another
    live process is never touched.
    """
    p = Path(target)
    removed = []
    if not p.parent.is_dir():
        return removed
    for q in p.parent.glob(f".{p.name}.tmp-*"):
        pid = q.name[len(f".{p.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(q, ignore_errors=True)
            removed.append(str(q))
    return removed


def interrupted_copy(path: str | os.PathLike) -> str | None:
    """The previous copy an interrupted two-rename replace left beside ``path`` (None if there is none)."""
    p = Path(path)
    olds = sorted(p.parent.glob(f".{p.name}.old-*"), key=lambda q: q.stat().st_mtime) if p.parent.is_dir() else []
    return str(olds[-1]) if olds else None


def missing_path_message(path: str | os.PathLike) -> str:
    old = interrupted_copy(path)
    if old:
        return (f"{path} does not exist, but an interrupted save left the previous copy at {old}: rename it back to "
                f"{path} to recover it")
    return f"{path} does not exist"


# ---------------------------------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------------------------------
# bytes per element of each safetensors dtype code (also used by wct.resources' memory estimates)
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype code) from a safetensors file, reading only its header.

    Also checks that the file is as long as the header says: a truncated download
    or an interrupted copy fails here with the file named, not deep in the loader.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise WCTCheckpointError(f"{path}: not a complete safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WCTCheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WCTCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, dtype = tuple(int(s) for s in info["shape"]), str(info["dtype"])
            begin, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise WCTCheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        width = SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is None or min(shape, default=0) < 0 or not 0 <= begin <= stop or stop - begin != numel * width:
            raise WCTCheckpointError(
                f"{path}: header entry {key!r} is inconsistent (shape {list(shape)}, dtype {dtype}, bytes "
                f"{begin}..{stop}): the file is corrupt; re-download or re-save it"
            )
        out[key] = (shape, dtype)
        spans.append((begin, stop, key))
    spans.sort()
    end = 0
    for begin, stop, key in spans:  # tensors must tile the data section: no gaps, no overlaps
        if begin != end:
            raise WCTCheckpointError(f"{path}: header entry {key!r} starts at byte {begin}, expected {end}: corrupt file")
        end = stop
    if 8 + n + end > size:
        raise WCTCheckpointError(
            f"{path}: truncated: the header needs {8 + n + end} bytes but the file has {size}; re-download or re-save it"
        )
    if 8 + n + end < size:
        raise WCTCheckpointError(
            f"{path}: {size - 8 - n - end} bytes after the last tensor the header describes: the file is corrupt "
            "(or was appended to); re-download or re-save it"
        )
    return out


__all__ = [
    "MANIFEST", "SAFETENSORS_DTYPE_BYTES", "CheckpointIntegrityError", "WCTCheckpointError", "read_safetensors_header", "atomic_folder", "check_target", "exchange", "file_sha256", "fsync_tree",
    "interrupted_copy", "missing_path_message", "remove_stale_temporaries", "swap_into_place", "verify_manifest", "write_manifest",
]
