"""Every write that must not be lost or half-done, in one place: atomic files and folders (temporary sibling,
fsync, one rename), fsync helpers, the output-folder rule and its lock, and disk-full errors turned into
`AdaspecError`s.

The output-folder rule (`claim_output_dir`, `check_output_folder`): a command writes only into a folder that is
new, empty, or one adaspec-eagle made itself (it holds the marker file `MARKER`, written when the tool claims
the folder). `--overwrite` (`--force` for export) replaces only such a folder; a folder holding anything else is
refused, and nothing in it is ever deleted."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from adaspec_eagle import AdaspecError

MARKER = ".adaspec-eagle"
"""Marker file of a folder adaspec-eagle made (JSON: what made it, when)."""
LOCK = ".lock"
IGNORED = {LOCK, MARKER}


# ----------------------------------------------------------------------------------------------------------
# fsync and atomic writes


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk (before a rename publishes it)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(folder: Path) -> None:
    """The modes a plain `open` / `mkdir` would give (umask applied) to `folder` and everything in it: mkdtemp,
    mkstemp and safetensors make 0700 / 0600, which a server running as another user cannot read."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync and os.replace: readers never see a
    half-written file, and a failed write (disk full) leaves the previous file intact and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: others (a server's user) could not read it
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(folder):
    """Yield a temporary sibling folder; on success its files are fsynced and it replaces `folder` in one rename
    (an old folder is moved aside first and deleted after). On error the temporary folder is deleted and `folder`
    is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        share(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_text(path, what: str = "file") -> str:
    """A text file's contents as UTF-8; a file that is not valid UTF-8 is an AdaspecError naming it and the byte
    offset, and a path that is a folder or unreadable one naming the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise AdaspecError(f"{what} {str(path)!r} is a folder, not a file.") from None
    except FileNotFoundError:
        raise AdaspecError(f"{what} {str(path)!r} does not exist.") from None
    except OSError as e:
        raise AdaspecError(f"cannot read {what} {str(path)!r}: {e.strerror or e}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdaspecError(f"{what} {str(path)!r} is not UTF-8 text: byte {e.start} (0x{raw[e.start]:02x}) cannot "
                           "be decoded; save the file as UTF-8.") from None


# ----------------------------------------------------------------------------------------------------------
# Disk full


def disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, however it arrives: an OSError, torch.save's RuntimeError from its C++ writer ("... file
    write failed"), safetensors' SafetensorError ("... No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "file write failed",
                                   "PytorchStreamWriter failed", "Disk quota exceeded"))


@contextlib.contextmanager
def disk_errors(what: str, where, kept: str = ""):
    """Turn a full disk (`disk_full`) or an unwritable place (PermissionError, a path under a file, ...) inside
    the block into an AdaspecError naming `what` was being written `where`, and what was kept."""
    try:
        yield
    except AdaspecError:
        raise
    except Exception as e:
        if disk_full(e):
            raise AdaspecError(f"the disk is full: could not write {what} to {str(where)!r}.{' ' + kept if kept else ''}"
                               " Free some space (or choose a folder on another disk) and run the command again."
                               ) from None
        if isinstance(e, OSError):
            raise AdaspecError(f"could not write {what} to {str(where)!r}: {e.strerror or e}. Choose a folder you "
                               f"can write to.{' ' + kept if kept else ''}") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# Output folders


def made_by_us(folder: Path) -> bool:
    """The folder holds the marker, or is a run, head or benchmark this tool wrote before it wrote markers: a
    resolved config.yaml (every one has `output_dir`), a head's config.json with its "adaspec" section, a
    bench.json, or an answer cache (regen.jsonl with its header) seeded from another run."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    try:
        if (folder / "config.yaml").is_file():
            saved = yaml.safe_load((folder / "config.yaml").read_text())
            return isinstance(saved, dict) and "output_dir" in saved
        if (folder / "config.json").is_file():
            return "adaspec" in json.loads((folder / "config.json").read_text())
        if (folder / "bench.json").is_file():  # a benchmark's results
            return "lossless" in json.loads((folder / "bench.json").read_text())
        if (folder / "regen.jsonl").is_file():  # the target's answers (a cache one run can hand to another)
            with open(folder / "regen.jsonl", encoding="utf-8") as f:
                return "regen" in json.loads(f.readline() or "{}")
    except (ValueError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return False


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing folder that adaspec-eagle did not make ([] for a folder it made or an empty one)."""
    folder = Path(folder)
    if not folder.exists() or made_by_us(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in IGNORED)


def check_output_folder(folder, replace: bool = False, flag: str = "--overwrite") -> None:
    """Refuse, before anything is written, an output `folder` that is a file, lies under a file, cannot be
    written, or holds files adaspec-eagle did not make (`--overwrite` does not change that: nothing foreign is
    ever deleted). `replace` is only allowed on a folder this tool made."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is" if parent == folder else f"lies under {str(parent)!r}, which is"
                raise AdaspecError(f"output folder {str(folder)!r} {where} a file; choose a folder path.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise AdaspecError(f"output folder {str(folder)!r} cannot be written ({str(parent)!r} is not "
                                   "writable for this user); choose a folder you can write to.")
            break
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise AdaspecError(f"output folder {str(folder)!r} holds files adaspec-eagle did not make ({shown}); it "
                           f"writes only into a new or empty folder or one it made, and {flag} never deletes other "
                           "files. Choose another folder.")


def mark_output_folder(folder, command: str) -> None:
    """Record that adaspec-eagle made `folder` (so a later run may resume it or --overwrite may replace it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not made_by_us(folder):
        atomic_write(folder / MARKER, json.dumps({"made_by": "adaspec-eagle", "command": command,
                                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def empty_folder(folder: Path) -> None:
    """Delete the contents of a folder this tool made (its marker and lock stay)."""
    folder = Path(folder)
    if not made_by_us(folder):
        raise AdaspecError(f"refusing to empty {str(folder)!r}: adaspec-eagle did not make it.")
    for p in folder.iterdir():
        if p.name not in IGNORED:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold an exclusive, non-blocking lock on `folder`/.lock for the block (created with the folder if needed);
    an AdaspecError if another live process holds it. The kernel drops the lock when its holder dies (even by
    SIGKILL), so a crashed run never blocks the next one."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        who = f" (process {holder})" if holder else ""
        raise AdaspecError(f"another run{who} is writing to {str(folder)!r} right now; wait for it to finish or "
                           "choose another output_dir.") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield folder
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
