"""Sealed stream: a data owner's Arrow record batches, encrypted end to end to an enclave's job key.

Construction (HPKE + STREAM):

1. The sender draws a fresh 32-byte data key and seals it with HPKE base mode (RFC 9180; X25519,
   HKDF-SHA256, AES-256-GCM) to the enclave's per-job public key. The HPKE ``info`` is
   :func:`hpke_info` and binds the job id, the plan hash and the evidence hash.
2. The :class:`StreamHeader` carries the :class:`StreamContext` (job, party, dataset, schema hash,
   plan hash, evidence hash), the serialized Arrow schema and the encapsulated data key.
3. Each frame is one flag byte (bit 0 = final, the other bits zero) followed by the AES-256-GCM
   ciphertext and tag of one payload (normally an Arrow IPC record-batch message). The nonce is
   ``4 zero bytes || seq`` (8-byte big-endian frame counter, never sent: both ends count) and the
   associated data is ``b"sealroom/v1/frame" || sha256(context.encode()) || seq || flag``.

Security model. Confidentiality and integrity hold against everyone who does not hold the job's
private key or the stream's data key (the coordinator, the operator's hosts, the network, other
parties). The receiver rejects, with one :class:`~sealroom.errors.IntegrityError` and one message
whatever the cause: a changed byte anywhere, a frame replayed, reordered, dropped or moved to another
stream (other data key; other job, party, dataset or schema in the associated data), a changed final
flag, a stream cut short (:meth:`OpeningStream.close`), a frame after the final one, a header whose
job id, plan hash or evidence hash was changed (HPKE ``info``) or whose schema does not match its
hash. After the first failure an :class:`OpeningStream` is dead.

What it deliberately does NOT do, so callers must:

- Authenticate the sender. HPKE base mode proves nothing about who sealed: anyone holding the job
  public key can build a stream that claims any party. Bind the header to its owner (for instance an
  Ed25519 signature by the owner over :meth:`StreamHeader.to_bytes`, or an authenticated channel)
  and verify that before opening.
- Check the context. :class:`OpeningStream` proves the header's context is the one the sender used;
  the enclave must still compare ``stream.context`` (job id, plan hash, evidence hash, party,
  dataset, schema hash) with the job it is running.
- Hide sizes. The header reveals the context and the schema (column names and types) in clear, and
  each frame reveals its payload length and whether it is the last one.

The payload of a frame is authenticated before it is parsed; a frame that authenticates but is not a
valid record batch of the header's schema is rejected too (``RecordBatch.validate(full=True)``), so
a malformed batch from a party cannot reach the engine. Dictionary-encoded columns are not
supported (an IPC record-batch message alone cannot carry dictionaries): cast them first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealroom.errors import IntegrityError

__all__ = [
    "SUITE_ID",
    "StreamContext",
    "StreamHeader",
    "SealingStream",
    "OpeningStream",
    "schema_hash",
    "hpke_info",
    "open_stream",
]

logger = logging.getLogger(__name__)

SUITE_ID: Final[str] = "x25519-hkdfsha256-aes256gcm"

_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

# Domain-separation labels; each is the first field of what it labels, so no two kinds of encoded
# object can be confused with each other. Changing any of them is a new wire version.
_CONTEXT_LABEL: Final = b"sealroom/v1/stream-context"
_HEADER_LABEL: Final = b"sealroom/v1/stream-header"
_HPKE_INFO_LABEL: Final = b"sealroom/v1/hpke-info"
_FRAME_LABEL: Final = b"sealroom/v1/frame"

_HASH_LEN: Final = 32
_KEY_LEN: Final = 32
_TAG_LEN: Final = 16
_X25519_ENC_LEN: Final = 32
_ENCAPSULATED_KEY_LEN: Final = _X25519_ENC_LEN + _KEY_LEN + _TAG_LEN
_MAX_NAME_BYTES: Final = 1024
_MAX_FRAMES: Final = 2**32
_FLAG_FINAL: Final = 0x01
_LEN: Final = struct.Struct(">I")

_INTEGRITY_MESSAGE: Final = (
    "a sealed data stream failed authentication (tampered, replayed, reordered, truncated, or "
    "sealed for another job, party, dataset or key); the whole stream was rejected and none of it "
    "was used"
)


class _Malformed(Exception):
    """Internal: raised while parsing or verifying; always converted to IntegrityError."""


def integrity_error() -> IntegrityError:
    """The one error for every way a sealed stream can fail (the enclave raises it too)."""
    return IntegrityError(_INTEGRITY_MESSAGE)


# --- canonical length-prefixed encoding -----------------------------------------------------------


def _pack(*fields: bytes) -> bytes:
    return b"".join(_LEN.pack(len(f)) + f for f in fields)


def _unpack(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` length-prefixed fields and nothing after them, or :class:`_Malformed`."""
    fields: list[bytes] = []
    pos = 0
    for _ in range(count):
        if len(data) - pos < _LEN.size:
            raise _Malformed("truncated length prefix")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if len(data) - pos < n:
            raise _Malformed("truncated field")
        fields.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise _Malformed("trailing bytes")
    return fields


def _check_name(field: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} must be encodable as UTF-8") from None
    if not 1 <= len(encoded) <= _MAX_NAME_BYTES:
        raise ValueError(f"{field} must be 1 to {_MAX_NAME_BYTES} bytes of UTF-8, got {len(encoded)}")
    return encoded


def _check_hash(field: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{field} must be bytes, not {type(value).__name__}")
    if len(value) != _HASH_LEN:
        raise ValueError(f"{field} must be {_HASH_LEN} bytes (SHA-256), got {len(value)}")
    return value


def _check_final(final: object) -> bool:
    if not isinstance(final, bool):
        raise TypeError(f"final must be a bool, not {type(final).__name__}")
    return final


def _as_bytes_view(data: object, what: str) -> memoryview:
    """A flat unsigned-byte view without copying (pyarrow buffers export signed bytes)."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(data).__name__}") from None
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def _as_input_bytes(data: object, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, not {type(data).__name__}")


# --- context, info, header ------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamContext:
    """What a stream is for. Bound into every frame's associated data (and partly into HPKE info).

    Validated on construction: names are non-empty ``str`` (at most 1024 bytes of UTF-8), hashes
    are 32 ``bytes``; a wrong type raises ``TypeError``, a wrong length ``ValueError``.
    """

    job_id: str
    party: str
    dataset: str
    schema_hash: bytes
    plan_hash: bytes
    evidence_hash: bytes

    def __post_init__(self) -> None:
        _check_name("job_id", self.job_id)
        _check_name("party", self.party)
        _check_name("dataset", self.dataset)
        _check_hash("schema_hash", self.schema_hash)
        _check_hash("plan_hash", self.plan_hash)
        _check_hash("evidence_hash", self.evidence_hash)

    def encode(self) -> bytes:
        """Canonical bytes: label, then each field with a 4-byte big-endian length prefix."""
        return _pack(
            _CONTEXT_LABEL,
            _check_name("job_id", self.job_id),
            _check_name("party", self.party),
            _check_name("dataset", self.dataset),
            _check_hash("schema_hash", self.schema_hash),
            _check_hash("plan_hash", self.plan_hash),
            _check_hash("evidence_hash", self.evidence_hash),
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> StreamContext:
        """Inverse of :meth:`encode`; :class:`IntegrityError` on anything else."""
        data = _as_input_bytes(data, "data")
        try:
            return cls._decode(data)
        except _Malformed as exc:
            logger.debug("sealed stream rejected: context %s", exc)
            raise integrity_error() from None

    @classmethod
    def _decode(cls, data: bytes) -> StreamContext:
        label, job_id, party, dataset, s_hash, p_hash, e_hash = _unpack(data, 7)
        if label != _CONTEXT_LABEL:
            raise _Malformed("unknown label or version")
        try:
            return cls(
                job_id=job_id.decode("utf-8"),
                party=party.decode("utf-8"),
                dataset=dataset.decode("utf-8"),
                schema_hash=s_hash,
                plan_hash=p_hash,
                evidence_hash=e_hash,
            )
        except (TypeError, ValueError) as exc:  # includes UnicodeDecodeError
            raise _Malformed("invalid field") from exc


def schema_hash(schema: pa.Schema) -> bytes:
    """SHA-256 of the schema's Arrow IPC serialization (field names, types, nullability, metadata)."""
    if not isinstance(schema, pa.Schema):
        raise TypeError(f"schema must be a pyarrow.Schema, not {type(schema).__name__}")
    return hashlib.sha256(_as_bytes_view(schema.serialize(), "schema")).digest()


def hpke_info(job_id: str, plan_hash: bytes, evidence_hash: bytes) -> bytes:
    """HPKE ``info`` for a stream's data key: label, suite, job id, plan hash, evidence hash."""
    return _pack(
        _HPKE_INFO_LABEL,
        SUITE_ID.encode("ascii"),
        _check_name("job_id", job_id),
        _check_hash("plan_hash", plan_hash),
        _check_hash("evidence_hash", evidence_hash),
    )


def _context_info(context: StreamContext) -> bytes:
    return hpke_info(context.job_id, context.plan_hash, context.evidence_hash)


@dataclass(frozen=True)
class StreamHeader:
    """Sent once, in clear, before the frames: context, schema bytes and the encapsulated data key."""

    context: StreamContext
    schema: bytes
    encapsulated_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.context, StreamContext):
            raise TypeError(f"context must be a StreamContext, not {type(self.context).__name__}")
        if not isinstance(self.schema, bytes):
            raise TypeError(f"schema must be bytes, not {type(self.schema).__name__}")
        if not isinstance(self.encapsulated_key, bytes):
            raise TypeError(f"encapsulated_key must be bytes, not {type(self.encapsulated_key).__name__}")
        if len(self.encapsulated_key) != _ENCAPSULATED_KEY_LEN:
            raise ValueError(
                f"encapsulated_key must be {_ENCAPSULATED_KEY_LEN} bytes for {SUITE_ID}, "
                f"got {len(self.encapsulated_key)}"
            )

    def to_bytes(self) -> bytes:
        return _pack(
            _HEADER_LABEL,
            SUITE_ID.encode("ascii"),
            self.context.encode(),
            self.schema,
            self.encapsulated_key,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> StreamHeader:
        """Inverse of :meth:`to_bytes`; :class:`IntegrityError` on anything else (incl. another suite)."""
        data = _as_input_bytes(data, "data")
        try:
            label, suite, context, schema, encapsulated_key = _unpack(data, 5)
            if label != _HEADER_LABEL:
                raise _Malformed("unknown label or version")
            if suite != SUITE_ID.encode("ascii"):
                raise _Malformed("unknown suite")
            try:
                return cls(StreamContext._decode(context), schema, encapsulated_key)
            except (TypeError, ValueError) as exc:
                raise _Malformed("invalid field") from exc
        except _Malformed as exc:
            logger.debug("sealed stream rejected: header %s", exc)
            raise integrity_error() from None

    def arrow_schema(self) -> pa.Schema:
        """The schema, after checking it against ``context.schema_hash``; :class:`IntegrityError` if not."""
        try:
            return self._arrow_schema()
        except _Malformed as exc:
            logger.debug("sealed stream rejected: schema %s", exc)
            raise integrity_error() from None

    def _arrow_schema(self) -> pa.Schema:
        if hashlib.sha256(self.schema).digest() != self.context.schema_hash:
            raise _Malformed("hash mismatch")
        try:
            schema = pa.ipc.read_schema(pa.py_buffer(self.schema))
        except (pa.ArrowException, ValueError, TypeError, LookupError, OSError, EOFError) as exc:
            raise _Malformed("unreadable") from exc
        if _has_dictionary(schema):
            raise _Malformed("dictionary-encoded field")
        return schema


def _has_dictionary(schema: pa.Schema) -> bool:
    def walk(t: pa.DataType) -> bool:
        if pa.types.is_dictionary(t):
            return True
        return any(walk(t.field(i).type) for i in range(t.num_fields))

    return any(walk(f.type) for f in schema)


def _nonce(seq: int) -> bytes:
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")


def _aad_prefix(context: StreamContext) -> bytes:
    return _FRAME_LABEL + hashlib.sha256(context.encode()).digest()


# --- sender ---------------------------------------------------------------------------------------


class SealingStream:
    """Sender side (the data owner's agent): seals a header once, then one frame per payload.

    ``_data_key`` exists only for known-answer tests; a stream must never reuse a data key, and the
    default (``os.urandom(32)``) guarantees it. Using it logs a warning. Not thread-safe: one stream,
    one writer.
    """

    header: StreamHeader

    def __init__(
        self,
        context: StreamContext,
        schema: pa.Schema,
        job_public_key: X25519PublicKey,
        *,
        _data_key: bytes | None = None,
    ) -> None:
        if not isinstance(context, StreamContext):
            raise TypeError(f"context must be a StreamContext, not {type(context).__name__}")
        if not isinstance(schema, pa.Schema):
            raise TypeError(f"schema must be a pyarrow.Schema, not {type(schema).__name__}")
        if not isinstance(job_public_key, X25519PublicKey):
            raise TypeError(f"job_public_key must be an X25519PublicKey, not {type(job_public_key).__name__}")
        schema_bytes = schema.serialize().to_pybytes()
        if hashlib.sha256(schema_bytes).digest() != context.schema_hash:
            raise ValueError("context.schema_hash is not schema_hash(schema); build the context from it")
        if _has_dictionary(schema):
            raise ValueError("dictionary-encoded fields cannot be sealed; cast them to their value type")
        if _data_key is None:
            data_key = os.urandom(_KEY_LEN)
        else:
            if not isinstance(_data_key, bytes):
                raise TypeError(f"_data_key must be bytes, not {type(_data_key).__name__}")
            if len(_data_key) != _KEY_LEN:
                raise ValueError(f"_data_key must be {_KEY_LEN} bytes, got {len(_data_key)}")
            logger.warning("SealingStream uses a caller-chosen data key: for known-answer tests only")
            data_key = _data_key
        self._schema = schema
        self._aead = AESGCM(data_key)
        self._aad_prefix = _aad_prefix(context)
        self._seq = 0
        self._done = False
        self.header = StreamHeader(
            context=context,
            schema=schema_bytes,
            encapsulated_key=_SUITE.encrypt(data_key, job_public_key, info=_context_info(context)),
        )

    def seal(self, payload: bytes | bytearray | memoryview | pa.Buffer, *, final: bool) -> bytes:
        """One frame: flag byte || AES-256-GCM(payload) || tag. ``ValueError`` after the final frame."""
        final = _check_final(final)
        view = _as_bytes_view(payload, "payload")
        if self._done:
            raise ValueError("this stream already sealed its final frame; start a new stream")
        if self._seq >= _MAX_FRAMES:
            raise ValueError(f"a stream holds at most {_MAX_FRAMES} frames; start a new stream")
        flag = _FLAG_FINAL if final else 0
        seq = self._seq
        aad = self._aad_prefix + seq.to_bytes(8, "big") + bytes((flag,))
        ciphertext = self._aead.encrypt(_nonce(seq), view, aad)
        self._seq = seq + 1
        self._done = final
        return bytes((flag,)) + ciphertext

    def seal_batch(self, batch: pa.RecordBatch, *, final: bool) -> bytes:
        """One frame carrying ``batch.serialize()`` (an IPC record-batch message, no schema)."""
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"batch must be a pyarrow.RecordBatch, not {type(batch).__name__}")
        if not batch.schema.equals(self._schema, check_metadata=False):
            raise ValueError("batch schema differs from the stream's schema")
        return self.seal(batch.serialize(), final=final)

    def frames(self, batches: Iterable[pa.RecordBatch]) -> Iterator[bytes]:
        """Seal every batch, the last one final; no batches gives one final frame with no payload."""
        pending: pa.RecordBatch | None = None
        for batch in batches:
            if pending is not None:
                yield self.seal_batch(pending, final=False)
            pending = batch
        if pending is None:
            yield self.seal(b"", final=True)
        else:
            yield self.seal_batch(pending, final=True)


# --- receiver -------------------------------------------------------------------------------------


class OpeningStream:
    """Receiver side (inside the enclave): opens the data key, then frames strictly in order.

    Every failure raises the same :class:`IntegrityError`, and the first one kills the stream: every
    later call raises it too (``finished`` is then False). The caller must still check
    :attr:`context` against the job it runs and authenticate the sender (see the module docstring).
    Not thread-safe: one stream, one reader.
    """

    context: StreamContext
    schema: pa.Schema

    def __init__(self, header: StreamHeader, job_private_key: X25519PrivateKey) -> None:
        if not isinstance(header, StreamHeader):
            raise TypeError(f"header must be a StreamHeader, not {type(header).__name__}")
        if not isinstance(job_private_key, X25519PrivateKey):
            raise TypeError(f"job_private_key must be an X25519PrivateKey, not {type(job_private_key).__name__}")
        self._dead = False
        self._finished = False
        self._seq = 0
        self._aead: AESGCM | None = None
        self.context = header.context
        try:
            self.schema = header._arrow_schema()
            try:
                data_key = _SUITE.decrypt(header.encapsulated_key, job_private_key, info=_context_info(header.context))
            except (InvalidTag, ValueError) as exc:
                raise _Malformed("data key did not open") from exc
            if len(data_key) != _KEY_LEN:
                raise _Malformed("data key length")
        except _Malformed as exc:
            self._fail(f"header: {exc}")
        self._aead = AESGCM(data_key)
        self._aad_prefix = _aad_prefix(header.context)

    @property
    def finished(self) -> bool:
        """True once a valid final frame was opened."""
        return self._finished and not self._dead

    def _fail(self, reason: str) -> NoReturn:
        self._dead = True
        self._aead = None
        logger.debug("sealed stream rejected: %s", reason)
        raise integrity_error() from None

    def open(self, frame: bytes | bytearray | memoryview | pa.Buffer) -> pa.Buffer:
        """Authenticate and decrypt the next frame into a new Arrow buffer (no extra copy)."""
        view = _as_bytes_view(frame, "frame")
        aead = self._aead
        if self._dead or aead is None:
            self._fail("stream already failed or closed")
        if self._finished:
            self._fail("frame after the final frame")
        if len(view) < 1 + _TAG_LEN:
            self._fail("frame too short")
        flag = view[0]
        if flag & ~_FLAG_FINAL:
            self._fail("reserved flag bits set")
        seq = self._seq
        if seq >= _MAX_FRAMES:
            self._fail("too many frames")
        aad = self._aad_prefix + seq.to_bytes(8, "big") + bytes((flag,))
        out = pa.allocate_buffer(len(view) - 1 - _TAG_LEN)
        try:
            aead.decrypt_into(_nonce(seq), view[1:], aad, _as_bytes_view(out, "buffer"))
        except InvalidTag:
            del out  # may hold unauthenticated plaintext; never returned
            self._fail("frame did not authenticate")
        self._seq = seq + 1
        if flag & _FLAG_FINAL:
            self._finished = True
        return out

    def open_batch(self, frame: bytes | bytearray | memoryview | pa.Buffer) -> pa.RecordBatch | None:
        """The next frame as a record batch of :attr:`schema`; ``None`` for an empty final frame."""
        buf = self.open(frame)
        if buf.size == 0 and self._finished:
            return None
        try:
            batch = pa.ipc.read_record_batch(buf, self.schema)
            batch.validate(full=True)
        except (pa.ArrowException, ValueError, TypeError, LookupError, OSError, EOFError):
            self._fail("payload is not a record batch of the header schema")
        return batch

    def close(self) -> None:
        """End of input: :class:`IntegrityError` unless the final frame was opened (truncation)."""
        if self._dead or not self._finished:
            self._fail("stream ended without its final frame")
        self._aead = None


def open_stream(
    header: StreamHeader, frames: Iterable[bytes], job_private_key: X25519PrivateKey
) -> list[pa.RecordBatch]:
    """All or nothing: every batch, only if every frame authenticated and the final one was seen."""
    stream = OpeningStream(header, job_private_key)
    batches: list[pa.RecordBatch] = []
    for frame in frames:
        batch = stream.open_batch(frame)
        if batch is not None:
            batches.append(batch)
    stream.close()
    return batches
