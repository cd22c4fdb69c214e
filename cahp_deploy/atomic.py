"""Atomic outputs: a directory (or file) appears complete or not at all.

Stages write into a temporary sibling of the target and rename it at the end, so an error or a
Ctrl-C never leaves a half-written artifact that a later stage (or a resumed ``run``) could trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cahp_deploy.errors import CahpError


def check_output_path(target: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing output unless ``force`` is set."""
    target = Path(target)
    if target.exists() and not force:
        raise CahpError(f"output {target} already exists; pass --force to overwrite it")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; on success it replaces ``target``.

    On any exception (KeyboardInterrupt included) the temp directory is removed and ``target`` is
    left exactly as it was.
    """
    target = check_output_path(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared with serving teams
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; on success it is renamed onto ``target``."""
    target = check_output_path(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
