"""File contents on disk, one file per id under the files directory.

Contents never go into SQLite: a 200 MB upload would bloat the database and its WAL. Writes
go to a temporary name and are renamed into place, so a crash never leaves a half-written
file under a real id. Ids are generated here (never taken from clients), so they are safe
path components.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from fastapi import UploadFile

from gateway.errors import APIError

_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,80}$")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileTooLarge(Exception):
    pass


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # prompts and completions: readable by the gateway's user only

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):
            raise APIError(404, f"No such File object: {file_id}", code="not_found", param="file_id")
        return self.root / file_id

    async def save_upload(self, file_id: str, upload: UploadFile, max_bytes: int) -> int:
        """Stream an upload to disk; raises FileTooLarge past ``max_bytes`` (nothing kept)."""
        final = self.path(file_id)
        tmp = final.with_name(final.name + ".part")
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLarge
                    out.write(chunk)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def write_lines(self, file_id: str, lines: Iterator[str]) -> int:
        """Write an output file atomically (re-writable: finalizing again replaces it)."""
        final = self.path(file_id)
        tmp = final.with_name(final.name + ".part")
        size = 0
        with open(tmp, "w", encoding="utf-8") as out:
            for line in lines:
                data = line + "\n"
                size += len(data.encode())
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        return size

    async def read_chunks(self, file_id: str, chunk: int = 1 << 16) -> AsyncIterator[bytes]:
        with open(self.path(file_id), "rb") as f:
            while data := f.read(chunk):
                yield data

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
