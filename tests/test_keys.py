"""API key hints (attack 9: a short key's hint used to be the whole key) and per-key limits in the
store, through the real ``chatai keys`` command on a real database: SQLite and PostgreSQL
(``database_url``; the PostgreSQL half runs in the slow tier)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.keys import KEY_PREFIX, KeyStore


def keys_cli(state_dir: Path, *args: str, database_url: str | None = None) -> str:
    env = {**os.environ, "CHATAI_GATEWAY_STATE_DIR": str(state_dir), "COLUMNS": "250"}
    if database_url is not None:
        env["CHATAI_GATEWAY_DATABASE_URL"] = database_url
    proc = subprocess.run([sys.executable, "-m", "chatai.cli", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def shows_more_than(key: str, text: str, n: int) -> bool:
    """Whether ``text`` holds more than ``n`` consecutive characters of the key's secret part."""
    secret = key.removeprefix(KEY_PREFIX)
    return any(secret[i:i + n + 1] in text for i in range(len(secret) - n))


def test_key_hints_reveal_at_most_four_characters_and_nothing_of_a_short_key(tmp_path, database_url):
    store = KeyStore(database_url)
    short = "sk-chatai-QzXwVkPy"  # 18 characters: the old hint (12 + 4) showed all but two of them
    bare = "JqZvXkWyQpZmXvKq"  # no prefix, 16 characters: the old hint showed it whole
    _, long_key = store.create("generated")
    store.create("short", short)
    store.create("bare", bare)
    hints = {k.name: k.hint for k in store.list()}
    store.close()
    assert hints == {"generated": "sk-chatai-…" + long_key[-4:], "short": "sk-chatai-…", "bare": "…"}
    listing = keys_cli(tmp_path, "list", database_url=database_url)  # what an operator's terminal shows
    assert "sk-chatai-…" + long_key[-4:] in listing
    assert not shows_more_than(long_key, listing, 4)
    assert not shows_more_than(short, listing, 2) and not shows_more_than(bare, listing, 2)


def test_an_older_database_gets_limit_columns_and_its_hints_cut_down(tmp_path):
    """Hints written by the old code could be a whole short key: they are redacted on first open."""
    db = sqlite3.connect(tmp_path / "gateway.db")
    db.execute("CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, "
               "hint TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL)")
    db.execute("INSERT INTO api_keys VALUES ('key_old', 'old', 'h1', 'sk-chatai-Qz…VkPy', 1.0, NULL)")
    db.execute("INSERT INTO api_keys VALUES ('key_odd', 'odd', 'h2', 'JqZvXkWyQpZm…XvKq', 1.0, NULL)")
    db.commit()
    db.close()
    store = KeyStore(tmp_path / "gateway.db")
    assert {k.id: k.hint for k in store.list()} == {"key_old": "sk-chatai-…", "key_odd": "…"}
    assert store.limits("key_old") == dict.fromkeys(("rpm", "tpm", "max_concurrent", "upload_bytes",
                                                      "open_batches"))
    store.close()


def test_keys_create_and_set_limits_store_per_key_limits(tmp_path, database_url):
    key_id, key = keys_cli(tmp_path, "create", "--name", "alice", "--rpm", "3", "--max-concurrent", "2",
                           database_url=database_url).split()
    store = KeyStore(database_url)
    assert store.verify(key) == key_id
    assert store.limits(key_id) == {"rpm": 3, "tpm": None, "max_concurrent": 2, "upload_bytes": None,
                                    "open_batches": None}
    keys_cli(tmp_path, "set-limits", key_id, "--tpm", "1000", "--rpm", "default", "--open-batches", "0",
             database_url=database_url)
    assert store.limits(key_id) == {"rpm": None, "tpm": 1000, "max_concurrent": 2, "upload_bytes": None,
                                    "open_batches": 0}
    store.close()
    listing = keys_cli(tmp_path, "list", database_url=database_url)
    assert "tpm=1000" in listing and "max-concurrent=2" in listing and "open-batches=0" in listing
    assert "rpm=" not in listing  # back to the default
    bad = subprocess.run([sys.executable, "-m", "chatai.cli", "keys", "set-limits", key_id, "--rpm", "-1"],
                         env={**os.environ, "CHATAI_GATEWAY_STATE_DIR": str(tmp_path),
                              "CHATAI_GATEWAY_DATABASE_URL": database_url}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole number" in bad.stderr
    with pytest.raises(ValueError):
        KeyStore(database_url).set_limits(key_id, {"rpm": -5})


def test_a_revoked_key_stops_and_a_key_cannot_be_created_twice(database_url):
    store = KeyStore(database_url)
    info, key = store.create("bob")
    assert store.verify(key) == info.id and store.get(info.id).name == "bob"
    with pytest.raises(ValueError, match="already exists"):
        store.create("again", key)
    assert store.revoke(info.id) and not store.revoke(info.id)
    assert store.verify(key) is None
    assert store.ensure("bob", key).id == info.id and store.verify(key) == info.id  # dev re-registers it
    store.close()
