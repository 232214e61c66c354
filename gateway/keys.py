"""API keys: random bearer tokens, stored only as SHA-256 hashes in the gateway's database
(SQLite, or PostgreSQL shared by replicas: gateway/database.py).

Keys are 256-bit random secrets, so a fast unsalted hash is enough: nothing can be brute-forced
from the database, and each request is one indexed look-up. Next to the hash: a hint for
``chatai keys list`` that reveals at most four characters of the secret (none of a short key),
and the key's own limits (NULL: the gateway's default, 0: unlimited; see gateway/limits.py).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.database import Database, open_database
from gateway.limits import LIMIT_NAMES

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
# Per-key limits, one column each, added to databases made before they existed (see _schema_v1).
LIMIT_COLUMNS = LIMIT_NAMES
_HINT_SHOWN = 4  # characters of the secret a hint may show
_HINT_MIN_SECRET = 24  # shorter secrets get no characters in their hint


def key_hint(key: str) -> str:
    """A label that tells keys apart without revealing them: the public prefix and the last four
    characters of a long secret (at most 4 of >= 24 random characters); nothing of a short one."""
    prefix = KEY_PREFIX if key.startswith(KEY_PREFIX) else ""
    secret = key[len(prefix):]
    return prefix + "…" + (secret[-_HINT_SHOWN:] if len(secret) >= _HINT_MIN_SECRET else "")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    hint: str
    created_at: float
    revoked_at: float | None
    limits: dict[str, int | None]  # the key's own limits; None: the gateway's default


def _schema_v1(db: Database) -> None:
    """The table; on a database made before per-key limits existed, their columns, and its hints
    (which could show a short key whole) cut down to the public prefix, since the secret cannot be
    read back."""
    db.ddl(_SCHEMA)
    have = db.columns("api_keys")
    for column in LIMIT_COLUMNS:
        if column not in have:
            db.ddl(f"ALTER TABLE api_keys ADD COLUMN {column} INTEGER")
    if "rpm" not in have:
        db.execute("UPDATE api_keys SET hint = CASE WHEN hint LIKE ? THEN ? ELSE '…' END",
                   (KEY_PREFIX + "%", KEY_PREFIX + "…"))


_MIGRATIONS = (_schema_v1,)


class KeyStore:
    def __init__(self, database: "str | Path | Database") -> None:
        """``database``: a URL (``sqlite:///...``, ``postgresql://...``), an SQLite path, or an open
        ``Database`` shared with the other stores."""
        self._db = open_database(database)
        self._db.migrate("api_keys", _MIGRATIONS)

    @property
    def shared(self) -> bool:
        """On PostgreSQL: replicas share these keys (and then their limits too)."""
        return self._db.postgres

    def create(self, name: str, key: str | None = None,
               limits: dict[str, int | None] | None = None) -> tuple[KeyInfo, str]:
        """A new key; the plain secret is returned once and never stored."""
        key = key or KEY_PREFIX + secrets.token_urlsafe(32)
        if len(key) < 16:
            raise ValueError("an API key must be at least 16 characters long")
        own = {c: None for c in LIMIT_COLUMNS} | _checked(limits or {})
        info = KeyInfo(id="key_" + secrets.token_hex(6), name=name, hint=key_hint(key),
                       created_at=time.time(), revoked_at=None, limits=own)
        inserted = self._db.execute(
            f"INSERT INTO api_keys (id, name, key_hash, hint, created_at, {', '.join(LIMIT_COLUMNS)}) "
            f"VALUES (?, ?, ?, ?, ?{', ?' * len(LIMIT_COLUMNS)}) ON CONFLICT (key_hash) DO NOTHING",
            (info.id, info.name, hash_key(key), info.hint, info.created_at, *(own[c] for c in LIMIT_COLUMNS)),
        ).rowcount
        if inserted != 1:
            raise ValueError("that key already exists")
        return info, key

    def set_limits(self, key_id: str, limits: dict[str, int | None]) -> bool:
        """Change some of a key's limits (None: back to the gateway's default); False if no such key.

        Gateways read limits on every request, so a change applies at once, without a restart.
        """
        changes = _checked(limits)
        if not changes:
            return self.get(key_id) is not None
        cur = self._db.execute(f"UPDATE api_keys SET {', '.join(f'{c} = ?' for c in changes)} WHERE id = ?",
                               (*changes.values(), key_id))
        return cur.rowcount == 1

    def limits(self, key_id: str) -> dict[str, int | None]:
        """The key's own limits (None where it uses the default); empty for an unknown key."""
        row = self._db.one(f"SELECT {', '.join(LIMIT_COLUMNS)} FROM api_keys WHERE id = ?", (key_id,))
        return dict(zip(LIMIT_COLUMNS, row)) if row else {}

    def get(self, key_id: str) -> KeyInfo | None:
        return next((k for k in self.list() if k.id == key_id), None)

    def ensure(self, name: str, key: str) -> KeyInfo:
        """Register a given key unless it is already known (used by ``chatai dev --api-key``)."""
        row = self._db.one("SELECT id FROM api_keys WHERE key_hash = ?", (hash_key(key),))
        if row:
            self._db.execute("UPDATE api_keys SET revoked_at = NULL WHERE id = ?", (row[0],))
            return self.get(row[0])
        return self.create(name, key)[0]

    def verify(self, key: str) -> str | None:
        """The key's id if it is valid and not revoked."""
        row = self._db.one("SELECT id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (hash_key(key),))
        return row[0] if row else None

    def list(self) -> list[KeyInfo]:
        rows = self._db.all(f"SELECT id, name, hint, created_at, revoked_at, {', '.join(LIMIT_COLUMNS)} "
                            "FROM api_keys ORDER BY created_at")
        return [KeyInfo(*r[:5], limits=dict(zip(LIMIT_COLUMNS, r[5:]))) for r in rows]

    def revoke(self, key_id: str) -> bool:
        cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                               (time.time(), key_id))
        return cur.rowcount == 1

    def close(self) -> None:
        self._db.close()


def _checked(limits: dict[str, int | None]) -> dict[str, int | None]:
    for name, value in limits.items():
        if name not in LIMIT_COLUMNS:
            raise ValueError(f"unknown limit {name!r}: use one of {', '.join(LIMIT_COLUMNS)}")
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a whole number >= 0 (0: unlimited), or None for the default")
    return dict(limits)
