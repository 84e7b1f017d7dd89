"""Where slow results live on disk, and how they are written so a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache directory: ``$TFA_CACHE_DIR`` if set, else ``~/.cache/tfa-widgets``.

    Returns
    -------
    Path
        The directory (not created here).
    """
    env = os.environ.get("TFA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tfa-widgets"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` then rename, so readers never see a partial file.

    Parameters
    ----------
    path : Path
        Final location; its directory is created if needed.
    write : callable
        Writes the whole content to the temporary path it is given (same directory as ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
