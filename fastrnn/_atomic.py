"""Writing a file so that a failure never loses the one it replaces.

    with replacing(path) as tmp:      # tmp: a new, empty file beside path
        with open(tmp, "wb") as f:
            ...                       # write everything
    # here tmp has been renamed over path (one atomic rename)

If the block raises (disk full, file too large, an exception while
serialising), the temporary file is removed and `path` is left as it was.

The temporary name is hidden, unique and made with O_EXCL:
".<name>.<pid>.<random>.fastrnn-tmp" beside `path` (<name> cut to NAME_BYTES
bytes). A fixed name such as "<path>.tmp" would overwrite whatever file of
the user's has that name.
"""

import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager

__all__ = ["replacing", "replacing_directory", "stale_temporaries"]

TMP_SUFFIX = ".fastrnn-tmp"
NAME_BYTES = 120     # of the target's name kept in the temporary one


def _prefix(path):
    """(directory, ".<name>."), the name cut to NAME_BYTES: a file name of up to 255
    bytes still gets a temporary name that fits (the random part keeps it unique)."""
    directory, base = os.path.split(os.path.abspath(path))
    while len(os.fsencode(base)) > NAME_BYTES:
        base = base[:-1]
    return directory, f".{base}."


def _temporary_name(path):
    directory, prefix = _prefix(path)
    return os.path.join(directory, f"{prefix}{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def _create_new(path, make):
    """make(name) for a new temporary name beside `path` (make must fail with
    FileExistsError on an existing name); returns the name."""
    while True:
        tmp = _temporary_name(path)
        try:
            make(tmp)
            return tmp
        except FileExistsError:   # 48 random bits taken: draw again
            continue


def _create_beside(path, make):
    """_create_new, with an OSError (a missing or read-only directory) naming the
    user's path and its directory rather than the hidden temporary name."""
    try:
        return _create_new(path, make)
    except OSError as exc:
        if exc.errno is None:
            raise
        directory = os.path.dirname(os.path.abspath(path))
        raise type(exc)(exc.errno, f"{exc.strerror} (writing {path}: cannot create a file "
                                   f"in {directory})", path) from exc


def _remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


@contextmanager
def replacing(path):
    """Yield the name of a new empty file beside `path`; when the block ends normally
    it replaces `path`, when it raises it is removed."""
    path = os.fspath(path)
    if os.path.islink(path):
        # the file the link names is replaced and the link kept, as open(path, "w") would
        path = os.path.realpath(path)
    # 0o666 & ~umask, as open(path, "w") would give a new file
    tmp = _create_beside(path, lambda name: os.close(os.open(
        name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)))
    try:
        yield tmp
        try:      # an existing file keeps its permissions (a private 0600 model stays so),
            # set once written (a read-only mode set before would refuse the writer)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if exc.filename == tmp and exc.errno is not None:
            # the user's name, not the hidden temporary one, in the message
            raise type(exc)(exc.errno, f"{exc.strerror} (writing {path}; it was left as "
                                       f"it was)", path) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def replacing_directory(path):
    """Yield the absolute name of a new empty directory beside `path`; when the block
    ends normally it takes `path`'s place (an existing directory there, with
    whatever parts an earlier run left, is removed after the rename), when it
    raises it is removed and `path` is left as it was. Not atomic as a whole (two
    renames), but a reader never sees old and new parts mixed."""
    path = os.path.abspath(os.fspath(path))
    tmp = _create_beside(path, os.mkdir)
    try:
        yield tmp
        old = None
        if os.path.isdir(path) and not os.path.islink(path):
            old = _temporary_name(path)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stale_temporaries(path):
    """(name, pid) of the temporary files that `replacing(path)` calls left beside
    `path` (a process killed while writing), for the caller to judge and remove.
    For a symbolic link, beside the file it names (where `replacing` writes)."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    directory, prefix = _prefix(path)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found.append((os.path.join(directory, name), int(m.group(1))))
    return found
