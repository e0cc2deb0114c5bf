"""A small strict CBOR (RFC 8949) decoder and encoder for COSE_Sign1 attestation documents.

Only what AWS Nitro attestation documents need: unsigned and negative integers, byte and text
strings, arrays, maps, tag 18 (COSE_Sign1) at the top, ``null``, ``true`` and ``false``. Refused:
indefinite lengths, floats, undefined, other simple values and tags, duplicate map keys, non-int/text
map keys, trailing bytes, nesting deeper than :data:`MAX_DEPTH`, and item counts or string lengths
that exceed the input. Non-minimal length encodings are accepted (well-formedness is checked, not
canonical form; the signature covers the exact bytes). Every refusal raises :class:`CBORError`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CBORError", "MAX_DEPTH", "COSE_SIGN1_TAG", "Tagged", "loads", "dumps"]

MAX_DEPTH = 16
MAX_ITEMS = 65536
COSE_SIGN1_TAG = 18


class CBORError(ValueError):
    """The bytes are not CBOR this decoder accepts."""


class Tagged:
    """A tagged item (only tag 18 is decoded)."""

    __slots__ = ("tag", "value")

    def __init__(self, tag: int, value: Any) -> None:
        self.tag = tag
        self.value = value


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise CBORError("CBOR item runs past the end of the input")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self._take(1)[0]
        if info == 25:
            return int.from_bytes(self._take(2), "big")
        if info == 26:
            return int.from_bytes(self._take(4), "big")
        if info == 27:
            return int.from_bytes(self._take(8), "big")
        if info == 31:
            raise CBORError("indefinite-length CBOR items are not accepted")
        raise CBORError(f"reserved CBOR additional information {info}")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CBORError("CBOR nesting is too deep")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            if info == 20:
                return False
            if info == 21:
                return True
            if info == 22:
                return None
            raise CBORError(f"CBOR simple value or float (info {info}) is not accepted")
        arg = self._argument(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            try:
                return self._take(arg).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CBORError("CBOR text string is not valid UTF-8") from exc
        if major == 4:
            # each item takes at least one byte: bound the count by what is left
            if arg > MAX_ITEMS or arg > len(self.data) - self.pos:
                raise CBORError("CBOR array is longer than the input allows")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if arg > MAX_ITEMS or 2 * arg > len(self.data) - self.pos:
                raise CBORError("CBOR map is longer than the input allows")
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                if not isinstance(key, (int, str)) or isinstance(key, bool):
                    raise CBORError("CBOR map keys must be integers or text strings")
                if key in out:
                    raise CBORError("CBOR map has a duplicate key")
                out[key] = self.item(depth + 1)
            return out
        # major == 6: tag
        if arg != COSE_SIGN1_TAG or depth != 0:
            raise CBORError(f"CBOR tag {arg} is not accepted here")
        return Tagged(arg, self.item(depth + 1))


def loads(data: bytes) -> Any:
    """Decode exactly one CBOR item filling all of ``data``."""
    decoder = _Decoder(bytes(data))
    value = decoder.item(0)
    if decoder.pos != len(decoder.data):
        raise CBORError("trailing bytes after the CBOR item")
    return value


def _head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes([(major << 5) | arg])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes([(major << 5) | info]) + arg.to_bytes(size, "big")
    raise CBORError("integer too large for CBOR")


def dumps(value: Any) -> bytes:
    """Encode ints, bytes, str, lists and dicts (in insertion order) with shortest-form heads."""
    if isinstance(value, bool) or value is None:
        return bytes([0xF5 if value is True else 0xF4 if value is False else 0xF6])
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return _head(2, len(raw)) + raw
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _head(3, len(raw)) + raw
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(dumps(v) for v in value)
    if isinstance(value, dict):
        return _head(5, len(value)) + b"".join(dumps(k) + dumps(v) for k, v in value.items())
    if isinstance(value, Tagged):
        return _head(6, value.tag) + dumps(value.value)
    raise CBORError(f"cannot encode {type(value).__name__} as CBOR")
