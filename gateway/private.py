"""The gateway's state is private to its OS user: directories 0700, files 0600, deletes that erase.

The state directory holds batch prompts and completions (SQLite and the files directory). Other
local users must not read them, and text a user deleted must not linger in free database pages
or old WAL frames. Every SQLite connection of the gateway is opened here, so each one has
``secure_delete`` on (deleted rows are overwritten with zeros) and its files have mode 0600.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077
DATABASE = "gateway.db"  # API keys and batches; SQLite adds its -wal and -shm beside it


def database(state_dir: Path) -> Path:
    """The gateway's one SQLite database in its state directory."""
    return state_dir / DATABASE


def restrict_umask() -> None:
    """Everything the gateway process creates from now on is private (SQLite's -wal, temp files...)."""
    os.umask(UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def private_tree(root: Path) -> None:
    """Make an existing tree private: directories 0700, regular files 0600 (symlinks untouched)."""
    private_dir(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, DIR_MODE)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)


def create_private(path: Path) -> int:
    """Open a new file for writing, 0600 from its first byte (no window with wider modes)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)


def connect(db_path: Path, **kwargs) -> sqlite3.Connection:
    """A connection to a private database: the file (and its -wal, -shm) 0600, secure_delete on.

    SQLite gives the -wal and -shm files the database file's mode, so the database file is
    created 0600 before SQLite first opens it.
    """
    private_dir(db_path.parent)
    if not db_path.exists():
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), Path(f"{db_path}-journal")):
        if p.exists():
            os.chmod(p, FILE_MODE)
    conn = sqlite3.connect(db_path, **kwargs)
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the database and truncate it, so old page images (deleted text) go too.

    False when a reader kept part of the WAL alive; the next checkpoint (SQLite runs them
    automatically, and every delete asks for one) finishes the job.
    """
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return busy == 0
