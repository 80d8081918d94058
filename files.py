"""files.py: durable, atomic writes. Every file the project saves (checkpoints, datasets, tokenizer ranks, logs
trimmed on resume, evaluation results) goes through atomic_write.

Ideas it rests on:
- Write to a temporary name unique to this process in the target's own folder, fsync it, rename it over the
  target, then fsync the folder: a crash, a kill or a full disk leaves either the old file or the new one,
  never half of one, and the rename survives a power cut.
- A failed write removes its temporary file and leaves the old target untouched.
"""
import os


def fsync_dir(path):
    """Make a rename or a new file in folder `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, mode="wb"):
    """Write `path` atomically: write(f) fills an open file object (mode "wb" or "w"), or, with mode None,
    write(tmp_path) writes a file at tmp_path itself (for writers that take a path, e.g. numpy's tofile)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        if mode is None:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename and e.errno:  # say which file could not be written
            raise OSError(e.errno, e.strerror, path) from e
        raise
    fsync_dir(folder)
    _remove_stale_temporaries(folder, os.path.basename(path))


def _remove_stale_temporaries(folder, name):
    """Temporary files of `name` left by processes that were killed mid-write (a checkpoint's can be gigabytes)."""
    prefix = f".{name}."
    for entry in os.listdir(folder):
        pid = entry[len(prefix):-len(".tmp")] if entry.startswith(prefix) and entry.endswith(".tmp") else ""
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
