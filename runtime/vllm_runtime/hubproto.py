"""The part of the Hugging Face Hub's download protocol that file servers share.

``huggingface_hub.hf_hub_download`` sends ``HEAD`` then ``GET /{repo}/resolve/{revision}/{file}`` and reads
``X-Repo-Commit``, ``ETag`` (the git blob id of a small file), ``X-Linked-Etag``/``X-Linked-Size`` (the
sha256 and size of an LFS file), ``Content-Length`` and, on resume, a ``Range`` request's 206 answer.
Both the loopback Hub (``vllm_runtime.devhub``, test tooling) and the sibling cache server
(``vllm_runtime.sibling_server``, in the runtime image) answer with these functions, so the two cannot
drift apart.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


class RangeNotSatisfiable(Exception):
    """A ``Range`` header that does not parse or lies outside the file: answer 416."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


def parse_range(header: str | None, size: int) -> tuple[int, int, bool]:
    """(first byte, last byte inclusive, partial) for one ``bytes=`` range of a ``size``-byte file.

    No header (or an empty file): the whole file, not partial. A suffix range ``bytes=-N`` is the last N bytes;
    an end past the file is clipped. Multiple ranges are not supported (huggingface_hub sends one).
    """
    if not header or not size:
        return 0, size - 1, False
    m = _RANGE_RE.match(header.strip())
    if m is None or (not m[1] and not m[2]):
        raise RangeNotSatisfiable("bad range", size)
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    else:
        start, end = max(size - int(m[2]), 0), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiable("range not satisfiable", size)
    return start, end, True


def file_headers(
    *, size: int, start: int, end: int, partial: bool, etag: str, filename: str,
    lfs_sha256: str | None = None, commit: str | None = None,
) -> dict[str, str]:
    """The headers of a file answer (200 or 206), as the Hub sends them.

    ``etag`` is what huggingface_hub names the blob after when no ``X-Linked-Etag`` comes (the git blob id of
    a small file); an LFS file also gets ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``.
    """
    headers: dict[str, str] = {}
    if commit:
        headers["X-Repo-Commit"] = commit
    headers.update({
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(end - start + 1 if size else 0),
        "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
    })
    if lfs_sha256:
        headers["X-Linked-Etag"] = f'"{lfs_sha256}"'
        headers["X-Linked-Size"] = str(size)
    if partial:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return headers


def safe_repo_path(raw: str, *, encoded: bool) -> str | None:
    """The repo-relative file path of a request (``encoded``: as sent, percent-encoded), or None if unsafe.

    Refused: encoded separators (``%2F``, ``%5C``, ``%00``), empty, ``.`` or ``..`` segments, backslashes,
    NUL, control characters, a leading ``/``.
    """
    if encoded and _ENCODED_SEPARATOR.search(raw):
        return None
    segments = raw.split("/")
    decoded = [unquote(s) for s in segments] if encoded else segments
    for segment in decoded:
        if segment in ("", ".", "..") or "\\" in segment or "/" in segment:
            return None
        if any(ord(c) < 32 or ord(c) == 127 for c in segment):
            return None
    return "/".join(decoded)
