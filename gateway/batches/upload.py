"""``multipart/form-data`` uploads streamed straight to their place, capped as the bytes arrive.

FastAPI's ``UploadFile`` would first spool the whole body to a temporary file (any size, before
the handler runs); here the file part goes into the files directory chunk by chunk (see
``FileStore.writing``) and stops at the size cap, and the other fields are small and few.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.multipart import MultipartParseError, MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from gateway.batches.files import FileStore, FileTooLarge
from gateway.errors import APIError

FILE_FIELD = "file"
MAX_FIELDS = 16
MAX_FIELD_BYTES = 4096


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, code="invalid_request", param=param)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


@dataclass
class Upload:
    fields: dict[str, str]
    filename: str
    size: int


@dataclass
class _Parts:
    """python-multipart callbacks: the file part is written out, small fields are kept."""

    out: BinaryIO
    max_bytes: int
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _name: bytes = b""
    _value: bytes = b""
    _field: str | None = None  # the plain field being read; None while in the file part
    _data: bytearray = field(default_factory=bytearray)
    _in_file: bool = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
                "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_finished}

    def _begin(self) -> None:
        self._headers, self._field, self._in_file = {}, None, False
        self._data.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise _bad("Every form part needs a name.")
        name = _text(options[b"name"])
        if b"filename" in options or name == FILE_FIELD:
            if name != FILE_FIELD or self.filename is not None:
                raise _bad("Send exactly one file, in the form field 'file'.", FILE_FIELD)
            self.filename = _text(options.get(b"filename", b""))
            self._in_file = True
            return
        if len(self.fields) >= MAX_FIELDS:
            raise _bad(f"Too many form fields (at most {MAX_FIELDS}).")
        self._field = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise FileTooLarge
            self.out.write(data[start:end])
        else:
            self._data += data[start:end]
            if len(self._data) > MAX_FIELD_BYTES:
                raise _bad(f"The form field '{self._field}' is too long.", self._field)

    def _part_end(self) -> None:
        if self._field is not None:
            self.fields[self._field] = _text(bytes(self._data))
        self._field, self._in_file = None, False


async def receive_upload(request: Request, files: FileStore, file_id: str, max_bytes: int) -> Upload:
    """Read the request's multipart body; the file part becomes ``file_id`` in ``files``.

    Raises FileTooLarge past ``max_bytes`` and APIError 400 for a body that is not a valid
    upload; either way nothing is left on disk.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise _bad("Upload the file as multipart/form-data with the fields 'file' and 'purpose'.")
    with files.writing(file_id) as out:
        parts = _Parts(out, max_bytes)
        try:
            parser = MultipartParser(params[b"boundary"], parts.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError:
            raise _bad("The upload is not valid multipart/form-data.") from None
        if parser.state != MultipartState.END:
            raise _bad("The upload ended before its closing boundary.")
        if parts.filename is None:
            raise _bad("No file: send it in the form field 'file'.", FILE_FIELD)
    return Upload(parts.fields, parts.filename, parts.size)
