"""File contents on disk, one file per id under the files directory.

Contents never go into the database: a 200 MB upload would bloat it (SQLite's WAL, PostgreSQL's
backups and replication). Replicas share the directory instead (CHATAI_GATEWAY_BATCH_FILES_DIR on
NFS or another shared filesystem, a volume in docker-compose.yml): what one writes, another
reads, since a file appears under its id only once whole (rename). Writes
go to a temporary name and are renamed into place, so a crash never leaves a half-written
file under a real id. Files are 0600 in a 0700 directory (see gateway/private.py). Ids are
generated here (never taken from clients), so they are safe path components.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gateway import private
from gateway.errors import APIError

_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,80}$")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileTooLarge(Exception):
    pass


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        private.private_tree(root)  # prompts and completions: readable by the gateway's user only

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):
            raise APIError(404, f"No such File object: {file_id}", code="not_found", param="file_id")
        return self.root / file_id

    @contextmanager
    def writing(self, file_id: str) -> Iterator[BinaryIO]:
        """Write a file's contents: under a temporary name (0600 from the first byte), renamed
        into place only when the block ends without error; on any error nothing is left."""
        final = self.path(file_id)
        tmp = final.with_name(final.name + ".part")
        try:
            with os.fdopen(private.create_private(tmp), "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_lines(self, file_id: str, lines: Iterator[str]) -> int:
        """Write an output file atomically (re-writable: finalizing again replaces it)."""
        size = 0
        with self.writing(file_id) as out:
            for line in lines:
                data = (line + "\n").encode()
                size += len(data)
                out.write(data)
        return size

    async def read_chunks(self, file_id: str, chunk: int = 1 << 16) -> AsyncIterator[bytes]:
        with open(self.path(file_id), "rb") as f:
            while data := f.read(chunk):
                yield data

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
