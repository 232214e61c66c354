"""API keys: random bearer tokens, stored only as SHA-256 hashes in the gateway's SQLite database.

Keys are 256-bit random secrets, so a fast unsalted hash is enough: nothing can be brute-forced
from the database, and each request is one indexed look-up.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gateway import private

KEY_PREFIX = "sk-chatai-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    hint: str
    created_at: float
    revoked_at: float | None


class KeyStore:
    def __init__(self, db_path: Path) -> None:
        self._db = private.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def create(self, name: str, key: str | None = None) -> tuple[KeyInfo, str]:
        """A new key; the plain secret is returned once and never stored."""
        key = key or KEY_PREFIX + secrets.token_urlsafe(32)
        if len(key) < 16:
            raise ValueError("an API key must be at least 16 characters long")
        info = KeyInfo(id="key_" + secrets.token_hex(6), name=name, hint=key[:12] + "…" + key[-4:],
                       created_at=time.time(), revoked_at=None)
        try:
            self._db.execute(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at) VALUES (?, ?, ?, ?, ?)",
                (info.id, info.name, hash_key(key), info.hint, info.created_at),
            )
        except sqlite3.IntegrityError:
            raise ValueError("that key already exists") from None
        return info, key

    def ensure(self, name: str, key: str) -> KeyInfo:
        """Register a given key unless it is already known (used by ``chatai dev --api-key``)."""
        row = self._db.execute("SELECT id FROM api_keys WHERE key_hash = ?", (hash_key(key),)).fetchone()
        if row:
            self._db.execute("UPDATE api_keys SET revoked_at = NULL WHERE id = ?", (row[0],))
            return next(k for k in self.list() if k.id == row[0])
        return self.create(name, key)[0]

    def verify(self, key: str) -> str | None:
        """The key's id if it is valid and not revoked."""
        row = self._db.execute(
            "SELECT id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (hash_key(key),)
        ).fetchone()
        return row[0] if row else None

    def list(self) -> list[KeyInfo]:
        rows = self._db.execute("SELECT id, name, hint, created_at, revoked_at FROM api_keys ORDER BY created_at")
        return [KeyInfo(*r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                               (time.time(), key_id))
        return cur.rowcount == 1

    def close(self) -> None:
        self._db.close()
