"""A C++ extension compiled at most once per machine, torch version, compiler
and sources, and loaded afterwards without ninja or a compiler.

Each build folder (one per Python and torch version and hash of the sources
and flags, so a binary found there is one of those sources) holds:

- ``build.json``, the record of the last try: the key it was made under and
  its outcome. A success is loaded directly, by importing the built ``.so``
  (no ninja, no compiler, no import of ``torch.utils.cpp_extension``). A
  failure made with the same compiler is not tried again by any process:
  it is raised at once, saying where the record is and how to retry (delete
  it, or pass ``retry``, which ``TORCHBLOCKS_EAGER_CPU=retry`` does). A new
  compiler (another path or version) tries again by itself.
- ``build.lock``, this module's lock around a build: ``fcntl.flock``, which
  the kernel releases when its holder dies, so that a killed build never
  blocks the next one; it holds the pid of the process building, for the
  message of a wait that runs out. Under it, the ``lock`` file that
  ``torch.utils.cpp_extension`` leaves behind when killed (on which it would
  wait forever) is removed before building.

The folder is looked for under the configured root (``$TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``), then under a folder of this user's in the
temporary directory; a build goes to the first of them that can be written.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

RECORD = "build.json"
LOCK = "build.lock"
BATON = "lock"  # torch.utils.cpp_extension's own lock file
WAIT_SECONDS = 900.0  # the longest wait for another process's build: a build takes 20-60 s


class BuildFailed(RuntimeError):
    """The extension could not be built or loaded here, and why."""


def configured_root() -> Path:
    """Where torch.utils.cpp_extension builds: ``$TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions``.

    Example::

        >>> configured_root()
        PosixPath('/root/.cache/torch_extensions')
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def fallback_root() -> Path:
    """The root used where the configured one cannot be written: a folder of
    this user's in the temporary directory.

    Example::

        >>> fallback_root()
        PosixPath('/tmp/torchblocks-0')
    """
    return Path(tempfile.gettempdir()) / f"torchblocks-{os.getuid()}"


def binary_key(files: Sequence[Path], flags: Sequence[str]) -> str:
    """A hash of what decides the binary: the bytes of ``files`` (sources and
    headers) and the compile ``flags``.

    Example::

        >>> binary_key([Path("eager_cpu.cpp")], ["-O3"])
        '3f2a9c1e0b7d4a65'
    """
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    digest.update("\0".join(flags).encode())
    return digest.hexdigest()[:16]


def compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension would use (``$CXX``, else
    ``c++``): its path and the first line of its ``--version``, or why none
    was found.

    Example::

        >>> compiler()
        '/usr/bin/c++: c++ (Debian 12.2.0-14+deb12u1) 12.2.0'
    """
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        return f"{name}: not found on PATH"
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        version = f"--version failed: {error}"
    return f"{path}: {version.strip().splitlines()[0] if version.strip() else 'no version'}"


def read_record(folder: Path) -> Optional[dict]:
    """The record of the last build in ``folder``, or None when there is none
    (or it cannot be read: then it counts as none).

    Example::

        >>> read_record(folder)
        {'key': {...}, 'compiler': '/usr/bin/c++: ...', 'ok': True, 'error': None, 'when': '...'}
    """
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_record(folder: Path, key: dict, ok: bool, error: Optional[str] = None) -> dict:
    """Records the outcome of a build in ``folder``, atomically (a reader
    sees the old record or the new one), and returns the record.

    Example::

        >>> write_record(folder, key, ok=False, error="RuntimeError: Ninja is required to load C++ extensions")
    """
    record = {"key": key, "compiler": compiler(), "ok": ok, "error": error,
              "when": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    partial = folder / f"{RECORD}.{os.getpid()}"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, folder / RECORD)
    return record


@contextmanager
def locked(folder: Path, timeout: Optional[float] = None):
    """Holds ``folder``'s build lock for the ``with`` block, creating the
    folder; waits at most ``timeout`` seconds (default ``WAIT_SECONDS``) for
    another process holding it.
    A lock left by a dead process is no lock (the kernel released it).
    Raises OSError when the folder cannot be written, BuildFailed when the
    wait runs out.

    Example::

        >>> with locked(build_folder):
        ...     build()
    """
    import fcntl  # POSIX; elsewhere the ImportError says why nothing is built

    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    timeout = WAIT_SECONDS if timeout is None else timeout
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise BuildFailed(f"waited {timeout:g} s for {folder / LOCK}, held by the build of pid "
                                      f"{holder}; expected it to finish sooner") from None
                time.sleep(0.1)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def claim(root: Path):
    """Makes ``root`` this user's own folder, writable by no one else, as the
    fallback root must be (it lies in a shared temporary directory, where
    another user could have left a module to load); raises OSError, saying
    what was found, where it is not.

    Example::

        >>> claim(fallback_root())
    """
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = root.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise PermissionError(f"expected {root} to be owned by uid {os.getuid()} and writable by no one else; "
                              f"found owner uid {status.st_uid}, mode {status.st_mode & 0o777:o}")


def import_built(folder: Path, name: str) -> ModuleType:
    """The extension module ``name`` built in ``folder``, imported from its
    ``.so`` as a plain Python extension: no ninja, no compiler.

    Example::

        >>> import_built(folder, "torchblocks_eager_cpu").relu(torch.randn(3), False)
    """
    path = folder / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BuildFailed(f"expected an extension module at {path}; found none that Python can load")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        raise BuildFailed(f"the module built at {path} does not load ({error}); delete {folder} to build it "
                          f"again") from error
    return module


def compile_extension(folder: Path, name: str, sources: Sequence[Path], flags: Sequence[str]) -> ModuleType:
    """Compiles ``sources`` into ``folder`` with torch.utils.cpp_extension and
    imports the result; ninja from the ninja wheel where none is on PATH.

    Example::

        >>> compile_extension(folder, "torchblocks_eager_cpu", [Path("eager_cpu.cpp")], ["-O3"])
    """
    from torch.utils import cpp_extension  # imported only when building: it is slow to import

    if shutil.which("ninja") is None:
        try:  # the ninja wheel's binary, where its venv's bin is not on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    return cpp_extension.load(name, [str(source) for source in sources], extra_cflags=list(flags),
                              build_directory=str(folder))


def _failed(folder: Path, error: str, when: str, compiler_used: str) -> BuildFailed:
    """The error of a failed build, its first line only: the whole of it is
    in the record, whose place and how to retry it names."""
    first = error.splitlines()[0] if error else "no message"
    first = first if len(first) <= 160 else first[:160] + " ..."
    return BuildFailed(f"{first} (on {when} with {compiler_used}; the whole error is recorded in "
                       f"{folder / RECORD}, and no process tries again with this compiler: delete that file "
                       f"or set TORCHBLOCKS_EAGER_CPU=retry to try again)")


def _remembered(folder: Path, key: dict, retry: bool) -> Optional[Callable[[], ModuleType]]:
    """How to get the module from ``folder``'s record alone: import a recorded
    success, raise a recorded failure of this compiler; None where the record
    says nothing for ``key``."""
    record = read_record(folder)
    if record is None or record.get("key") != key:
        return None
    if record.get("ok") and (folder / f"{key['name']}.so").exists():
        return lambda: import_built(folder, key["name"])
    if record.get("ok") or retry or record.get("compiler") != compiler():
        return None

    def failed():
        raise _failed(folder, record.get("error"), record.get("when"), record.get("compiler"))
    return failed


def _build_in(folder: Path, key: dict, sources: Sequence[Path], flags: Sequence[str], retry: bool,
              announce: Callable[[Path], None]) -> ModuleType:
    """Builds in ``folder`` under its lock, unless a process that held the lock
    before has settled it; records the outcome."""
    with locked(folder):
        known = _remembered(folder, key, retry)
        if known is not None:
            return known()
        (folder / BATON).unlink(missing_ok=True)  # left by a killed build: under our lock no one else holds it
        announce(folder)
        try:
            module = compile_extension(folder, key["name"], sources, flags)
        except Exception as error:  # no compiler, no ninja, a compile error: remembered
            record = write_record(folder, key, ok=False, error=f"{type(error).__name__}: {error}".strip()[:20000])
            raise _failed(folder, record["error"], record["when"], record["compiler"]) from error
        write_record(folder, key, ok=True)
        return module


def load_or_build(name: str, folders: Sequence[Path], sources: Sequence[Path], headers: Sequence[Path],
                  flags: Sequence[str], retry: bool = False,
                  announce: Callable[[Path], None] = lambda folder: None) -> ModuleType:
    """The extension module ``name`` compiled from ``sources`` (which include
    ``headers``) with ``flags``: loaded from a recorded build in one of
    ``folders``, else built in the first of them that can be written
    (``announce(folder)`` is called before compiling). Raises BuildFailed,
    saying why, when it was not built: a failure remembered (unless
    ``retry``), a failure now (then remembered), no folder that can be
    written, a wait for another build that ran out.

    Example::

        >>> name = "torchblocks-py311-torch2.13.0-3f2a9c1e0b7d4a65"
        >>> folders = [configured_root() / name, fallback_root() / name]
        >>> load_or_build("torchblocks_eager_cpu", folders, [Path("eager_cpu.cpp")], [Path("watched.h")], ["-O3"])
    """
    key = {"name": name, "python": f"{sys.version_info.major}.{sys.version_info.minor}", "torch": torch.__version__,
           "binary": binary_key([*sources, *headers], flags)}
    for folder in folders:
        known = _remembered(folder, key, retry)
        if known is not None:
            return known()
    unwritable = []
    for folder in folders:
        try:
            if folder.parent == fallback_root():
                claim(folder.parent)
            return _build_in(folder, key, sources, flags, retry, announce)
        except OSError as error:  # a read-only or missing root: try the next
            unwritable.append(f"{folder}: {error}")
    raise BuildFailed(f"expected a folder this user can write to build in; found none ({'; '.join(unwritable)})")
