"""The ``model`` form field of a multipart/form-data body (RFC 7578).

:func:`find_multipart_model` finds it in a complete body by scanning part
headers, refusing two of them; :class:`MultipartModelScan` finds it in a body
still arriving, in one pass; :func:`part_name` reads a part's field name the
one way every form parser would.
"""

from __future__ import annotations

import re

from ..errors import InvalidRequest
from .model import FoundModel, ModelAbsent, missing_model

__all__ = ["MultipartModelScan", "find_multipart_model", "multipart_boundary", "part_name"]


def multipart_boundary(content_type_params: dict[str, str]) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type (RFC 2046 §5.1.1)."""
    boundary = content_type_params.get("boundary", "")
    if not 1 <= len(boundary) <= 70:
        raise InvalidRequest(
            "multipart/form-data needs a boundary of 1 to 70 characters",
            code="invalid_multipart",
        )
    return boundary.encode("latin-1", "replace")


def find_multipart_model(body: bytes | bytearray, boundary: bytes) -> FoundModel:
    """Return the value of the ``model`` form field of a complete multipart body.

    Raises :class:`ModelAbsent` when no part is named ``model``,
    ``missing_model`` when its value is empty or not UTF-8, ``ambiguous_model``
    when two are, and ``invalid_multipart`` when the framing is broken.
    """
    delimiter = b"--" + boundary
    # The first delimiter may open the body or follow a preamble line (RFC 2046).
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise _bad_multipart("no boundary found")
        pos += 2
    marker = b"\r\n" + delimiter
    found: FoundModel | None = None
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break  # close delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise _bad_multipart("unterminated boundary line")
        headers_end = _headers_end(body, line_end, len(body))
        content_start = headers_end + 4
        # From the CRLF that ends the header block: a part may be empty, the
        # next delimiter opening with that CRLF (RFC 2046 §5.1.1: a body-part's
        # headers and its CRLF *OCTET are both optional).
        next_delim = body.find(marker, content_start - 2)
        if next_delim < 0:
            raise _bad_multipart("no closing boundary")
        content_start = min(content_start, next_delim)
        if part_name(body[line_end + 2 : headers_end]) == "model":
            if found is not None:
                raise InvalidRequest(
                    "the form names 'model' more than once", code="ambiguous_model", param="model"
                )
            raw = body[content_start:next_delim]
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    "the model field is not UTF-8 text", code="missing_model", param="model"
                ) from None
            found = FoundModel(value, content_start, next_delim, False)
        pos = next_delim + 2
    if found is None:
        raise ModelAbsent()
    if not found.model:
        raise missing_model()
    return found


def _headers_end(body: bytes | bytearray, line_end: int, stop: int) -> int:
    """Where the header block of the part whose boundary line ends at
    ``line_end`` ends (its CRLF CRLF found before ``stop``), or ``line_end``
    for a part with no headers; else the framing is broken."""
    headers_end = body.find(b"\r\n\r\n", line_end, stop)
    if headers_end >= 0:
        return headers_end
    if body.startswith(b"\r\n", line_end + 2):
        return line_end
    raise _bad_multipart("part headers never end")


class MultipartModelScan:
    """:func:`find_multipart_model` for a body that is still arriving, in one pass.

    ``feed(buf)`` is called with the body read so far (``buf`` only grows). It
    returns the model field once a prefix of the body, closed right after some
    delimiter, holds it: the answer :func:`find_multipart_model` gives for the
    first such closed prefix, and the same errors, found at the same
    delimiter. Each part is looked at once, when the delimiter after it
    arrives, so a form whose model comes last costs time linear in its size,
    where re-parsing every closed prefix would be quadratic (docs/decisions.md,
    "The multipart model scan is linear").

    After a close delimiter, or a model value that is not UTF-8 text, it looks
    no further: the parse of the whole body gives the answer then.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._marker = b"\r\n--" + boundary
        self._searched = 0  # every delimiter starting before this offset has been handled
        self._part = -1  # where the open part's delimiter starts (-1: none seen yet)
        self._found: FoundModel | None = None
        # A boundary holding CR or LF could overlap its own delimiters: leave
        # such a form to the whole-body parse (header values cannot hold them).
        self._done = b"\r" in boundary or b"\n" in boundary

    def feed(self, buf: bytes | bytearray) -> FoundModel | None:
        """The model field, if the delimiters in ``buf`` close it, else None."""
        marker = self._marker
        while not self._done:
            at = buf.find(marker, self._searched)
            if at < 0:
                self._searched = max(self._searched, len(buf) - len(marker) + 1)
                return None
            self._searched = at + len(marker)
            if self._part < 0 and not buf.startswith(self._delimiter):
                self._part = at + 2  # the first delimiter, after a preamble
                continue
            self._part_ending(buf, max(self._part, 0), at)
            if self._found is not None and self._found.model:
                return self._found
        return None

    def _part_ending(self, buf: bytes | bytearray, start: int, end: int) -> None:
        """One pass of find_multipart_model's loop for the part whose delimiter is at
        ``start``, in the body closed at the delimiter at ``end``. Searches stop
        where that closed body would differ from ``buf``."""
        pos = start + len(self._delimiter)
        if buf.startswith(b"--", pos):
            self._done = True  # the close delimiter: the whole-body parse decides
            return
        line_end = buf.find(b"\r\n", pos)  # at most ``end``: the delimiter opens with CRLF
        headers_end = _headers_end(buf, line_end, end + 2)
        content_start = headers_end + 4
        if content_start == end + 2:  # an empty part (see find_multipart_model)
            content_start = end
        elif content_start > end:
            raise _bad_multipart("no closing boundary")
        if part_name(buf[line_end + 2 : headers_end]) == "model":
            if self._found is not None:
                raise InvalidRequest(
                    "the form names 'model' more than once", code="ambiguous_model", param="model"
                )
            try:
                value = buf[content_start:end].decode("utf-8")
            except UnicodeDecodeError:
                self._done = True
                return
            self._found = FoundModel(value, content_start, end, False)
        self._part = end + 2


# RFC 7578 §4.2 parameters: token=token or token="quoted" (no quoted-pair).
_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_DISPOSITION_PARAM = re.compile(rf'\s*;\s*({_TOKEN_CHARS})\s*=\s*("[^"\\]*"|{_TOKEN_CHARS})\s*')


def part_name(header_block: bytes | bytearray) -> str | None:
    """The form field name of a part, as every form parser would read it.

    A part whose name parsers could read differently is refused
    (``invalid_multipart``), not guessed at (docs/faults.md, "Form parts that
    parsers read differently"): two
    ``Content-Disposition`` headers (parsers differ on which wins), a parameter
    given twice or in RFC 2231 ``name*=`` form, a backslash (aiohttp unescapes
    ``"mod\\el"`` to ``model``, Python's email parser keeps the backslash).
    The ``model`` part must be a plain field: no ``filename``, no
    ``Content-Transfer-Encoding`` (deprecated by RFC 7578 §4.7, and a decoder
    honouring it would see another value).
    """
    disposition: bytes | bytearray | None = None
    encoded = False
    for line in header_block.split(b"\r\n"):
        field, sep, value = line.partition(b":")
        if not sep:
            continue
        field = field.strip().lower()
        if field == b"content-disposition":
            if disposition is not None:
                raise _bad_multipart("a part has two Content-Disposition headers")
            disposition = value
        elif field == b"content-transfer-encoding":
            encoded = True
    if disposition is None:
        return None
    # latin-1 maps bytes 1:1, so the structure is read exactly; names compare as ASCII.
    text = disposition.decode("latin-1").strip()
    kind, _, rest = text.partition(";")
    if "\\" in text or kind.strip().lower() != "form-data":
        raise _bad_multipart("a part's Content-Disposition is not plain form-data")
    params: dict[str, str] = {}
    pos = len(kind)
    while pos < len(text):
        m = _DISPOSITION_PARAM.match(text, pos)
        if m is None:
            raise _bad_multipart("a part's Content-Disposition cannot be read one way only")
        key, given = m.group(1).lower(), m.group(2)
        if key in params or key.endswith("*"):
            raise _bad_multipart("a part's Content-Disposition cannot be read one way only")
        params[key] = given[1:-1] if given.startswith('"') else given
        pos = m.end()
    name = params.get("name")
    if name == "model" and ("filename" in params or encoded):
        raise _bad_multipart("the model field must be a plain form field")
    return name


def _bad_multipart(detail: str) -> InvalidRequest:
    return InvalidRequest(
        f"The multipart/form-data body could not be parsed: {detail}.", code="invalid_multipart"
    )
