"""The unipair cache folder: where offline assets (emoji data, converted encoder weights) live.

Location: the ``cache_dir`` argument when given, else ``$UNIPAIR_CACHE``, else
``$XDG_CACHE_HOME/unipair`` (``~/.cache/unipair`` when ``XDG_CACHE_HOME`` is unset).

Everything written here is written atomically (to a temporary name in the same folder, then
renamed), so an interrupted download or conversion never leaves a half-written file under its
final name. Files that must be trusted later carry a sha256 checksum, checked when read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV_VAR = "UNIPAIR_CACHE"
CHECKSUM_SUFFIX = ".sha256"
_TEMP_PREFIX = ".tmp-"


class CacheError(RuntimeError):
    """A cache file is missing, corrupted or truncated; the message says which and how to rebuild."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache folder (not created): ``cache_dir``, ``$UNIPAIR_CACHE`` or ``~/.cache/unipair``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "unipair"


def cache_subdir(name: str, cache_dir: str | os.PathLike | None = None, create: bool = True) -> Path:
    """Return ``<cache>/<name>``, created when ``create`` is true."""
    path = cache_root(cache_dir) / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def rebuild_hint(folder: Path, command: str) -> str:
    """The sentence every cache error ends with: which folder to delete and what to run."""
    return f"Delete the folder {folder} and rebuild it with `{command}` (needs network the first time)."


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str, chunk_size: int = 1 << 20) -> bytes:
    """Raw digest (bytes) of a file with a ``hashlib`` algorithm name (e.g. "sha512", "sha1")."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.digest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``final_path``; rename it into place only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    ``final_path`` is left untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX + final_path.name + ".", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp creates 0600; cache files are ordinary
        os.replace(tmp_path, final_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final_path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``final_path`` atomically."""
    with atomic_path(final_path) as tmp:
        tmp.write_bytes(data)
    return Path(final_path)


def atomic_write_text(final_path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (utf-8) to ``final_path`` atomically."""
    return atomic_write_bytes(final_path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final_dir``; rename it to ``final_dir`` on success.

    If ``final_dir`` appeared meanwhile (another process finished first) the new copy is
    discarded. On failure the temporary folder is removed.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX + final_dir.name + ".", dir=final_dir.parent))
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o777 & ~_current_umask())  # mkdtemp creates 0700
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes in ``folder`` (e.g. after a SIGKILL); return the
    count.
    """
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(_TEMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def cache_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so concurrent prepares (e.g. several ranks) run one at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the cache consistent
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checksum_path(path: str | os.PathLike) -> Path:
    """The sidecar file holding ``path``'s sha256: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | os.PathLike) -> str:
    """Compute ``path``'s sha256 and write it atomically to the sidecar (``sha256sum`` format)."""
    path = Path(path)
    digest = sha256_file(path)
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")
    return digest


def verify_checksum(path: str | os.PathLike, hint: str) -> str:
    """Check ``path`` against its sha256 sidecar; raise :class:`CacheError` naming the file and ``hint``."""
    path = Path(path)
    sidecar = checksum_path(path)
    if not path.is_file():
        raise CacheError(f"Cache file {path} is missing. {hint}")
    if not sidecar.is_file():
        raise CacheError(
            f"Checksum file {sidecar} for {path} is missing, so {path} cannot be trusted. {hint}"
        )
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CacheError(f"Checksum file {sidecar} is corrupted (expected a 64-hex-digit sha256). {hint}")
    actual = sha256_file(path)
    if actual != expected:
        raise CacheError(
            f"Cache file {path} is corrupted or truncated: sha256 {actual} does not match "
            f"{expected} recorded in {sidecar}. {hint}"
        )
    return actual
