"""Sealed stream: round trips, known answers, and one negative test per way a stream can be broken.

Real cryptography throughout (no mocks). Every authentication failure must be the same
``IntegrityError`` with the same message, and ``open_stream`` must never hand back part of a stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealroom.errors import IntegrityError
from sealroom.sealed import (
    SUITE_ID,
    OpeningStream,
    SealingStream,
    StreamContext,
    StreamHeader,
    hpke_info,
    open_stream,
    schema_hash,
)

REPO = Path(__file__).resolve().parents[3]
KAT = json.loads((REPO / "tests" / "data" / "sealed_kat.json").read_text())

SCHEMA = pa.schema([("id", pa.int64()), ("age", pa.int32()), ("exposure", pa.float64()), ("segment", pa.string())])
SECRET = "SECRET-ROW-VALUE-7f3a"


def _mixed_table(n: int) -> pa.Table:
    return pa.table(
        {
            "id": [None if i % 7 == 3 else i for i in range(n)],
            "age": [None if i % 5 == 1 else 18 + i % 70 for i in range(n)],
            "exposure": [None if i % 11 == 2 else i * 1.25 - 300.0 for i in range(n)],
            "segment": [None if i % 4 == 0 else (SECRET if i == 5 else f"seg-{i % 9}") for i in range(n)],
        },
        schema=SCHEMA,
    )


TABLE = _mixed_table(1000)
JOB_KEY = X25519PrivateKey.generate()
OTHER_KEY = X25519PrivateKey.generate()
PLAN = hashlib.sha256(b"plan").digest()
EVIDENCE = hashlib.sha256(b"evidence").digest()


def _context(
    *, job_id: str = "job-1", party: str = "bank_a", dataset: str = "loans", schema: pa.Schema = SCHEMA
) -> StreamContext:
    return StreamContext(
        job_id=job_id,
        party=party,
        dataset=dataset,
        schema_hash=schema_hash(schema),
        plan_hash=PLAN,
        evidence_hash=EVIDENCE,
    )


def _seal(
    batches: list[pa.RecordBatch] | None = None,
    *,
    context: StreamContext | None = None,
    key: X25519PrivateKey = JOB_KEY,
    data_key: bytes | None = None,
) -> tuple[StreamHeader, list[bytes]]:
    if batches is None:
        batches = TABLE.to_batches(max_chunksize=250)
    sender = SealingStream(context or _context(), SCHEMA, key.public_key(), _data_key=data_key)
    return sender.header, list(sender.frames(batches))


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def _kat_batches() -> list[pa.RecordBatch]:
    schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(KAT["schema"])))
    return [
        pa.record_batch(
            {
                "id": [1, 2, None],
                "age": [34, None, 51],
                "exposure": [1000.5, -2.25, None],
                "segment": ["retail", None, "sme"],
            },
            schema=schema,
        ),
        pa.record_batch({"id": [4], "age": [29], "exposure": [0.0], "segment": ["corporate"]}, schema=schema),
    ]


def _kat_context() -> StreamContext:
    c = KAT["context"]
    return StreamContext(
        job_id=c["job_id"],
        party=c["party"],
        dataset=c["dataset"],
        schema_hash=bytes.fromhex(c["schema_hash"]),
        plan_hash=bytes.fromhex(c["plan_hash"]),
        evidence_hash=bytes.fromhex(c["evidence_hash"]),
    )


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_several_batches_of_a_mixed_table() -> None:
    header, frames = _seal()
    assert len(frames) == 4
    assert [f[0] for f in frames] == [0, 0, 0, 1]

    received = OpeningStream(StreamHeader.from_bytes(header.to_bytes()), JOB_KEY)
    assert received.context == _context()
    assert received.schema.equals(SCHEMA)
    batches = []
    for frame in frames:
        assert not received.finished
        batch = received.open_batch(frame)
        assert batch is not None
        batches.append(batch)
    assert received.finished
    received.close()

    assert pa.Table.from_batches(batches).equals(TABLE)
    assert pa.Table.from_batches(open_stream(header, frames, JOB_KEY)).equals(TABLE)


def test_header_bytes_round_trip() -> None:
    header, _ = _seal()
    assert StreamHeader.from_bytes(header.to_bytes()) == header
    assert StreamHeader.from_bytes(bytearray(header.to_bytes())) == header
    assert header.arrow_schema().equals(SCHEMA)
    assert StreamContext.decode(header.context.encode()) == header.context


def test_empty_input_is_one_final_frame_with_empty_payload() -> None:
    header, frames = _seal([])
    assert len(frames) == 1
    assert frames[0][0] == 1 and len(frames[0]) == 1 + 16
    received = OpeningStream(header, JOB_KEY)
    assert received.open_batch(frames[0]) is None
    assert received.finished
    received.close()
    assert open_stream(header, frames, JOB_KEY) == []


def test_zero_row_batch_round_trips_as_a_batch() -> None:
    empty = TABLE.slice(0, 0).combine_chunks().to_batches()
    empty = empty or [pa.RecordBatch.from_pylist([], schema=SCHEMA)]
    header, frames = _seal(empty)
    [batch] = open_stream(header, frames, JOB_KEY)
    assert batch.num_rows == 0 and batch.schema.equals(SCHEMA)


def test_trailing_empty_final_frame_after_batches() -> None:
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    frames = [sender.seal_batch(b, final=False) for b in TABLE.to_batches(max_chunksize=400)]
    frames.append(sender.seal(b"", final=True))
    assert pa.Table.from_batches(open_stream(sender.header, frames, JOB_KEY)).equals(TABLE)


def test_open_decrypts_into_an_arrow_buffer_the_batch_uses_without_copy() -> None:
    header, frames = _seal(TABLE.to_batches(max_chunksize=1000))
    received = OpeningStream(header, JOB_KEY)
    buf = received.open(frames[0])
    assert isinstance(buf, pa.Buffer)
    assert buf.size == len(frames[0]) - 1 - 16
    batch = pa.ipc.read_record_batch(buf, received.schema)
    values = batch.column("exposure").buffers()[1]
    assert buf.address <= values.address < buf.address + buf.size


def test_seal_and_open_accept_bytes_like_and_arrow_buffers() -> None:
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    payloads = [b"one", bytearray(b"two"), memoryview(b"three"), pa.py_buffer(b"four")]
    frames = [sender.seal(p, final=i == 3) for i, p in enumerate(payloads)]
    received = OpeningStream(sender.header, JOB_KEY)
    inputs = [frames[0], memoryview(frames[1]), pa.py_buffer(frames[2]), bytearray(frames[3])]
    assert [received.open(f).to_pybytes() for f in inputs] == [b"one", b"two", b"three", b"four"]
    received.close()


# --- known answers ------------------------------------------------------------------------------


def test_kat_context_encoding_and_hpke_info() -> None:
    context = _kat_context()
    assert context.encode().hex() == KAT["context_encoded"]
    assert hpke_info(context.job_id, context.plan_hash, context.evidence_hash).hex() == KAT["hpke_info"]
    assert StreamContext.decode(bytes.fromhex(KAT["context_encoded"])) == context
    assert SUITE_ID == "x25519-hkdfsha256-aes256gcm"


def test_kat_frames_from_fixed_data_key_and_context() -> None:
    batches = _kat_batches()
    schema = batches[0].schema
    assert schema.serialize().to_pybytes().hex() == KAT["schema"]
    assert [b.serialize().to_pybytes().hex() for b in batches] == KAT["payloads"]

    job_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(KAT["job_private_key"]))
    sender = SealingStream(_kat_context(), schema, job_key.public_key(), _data_key=bytes.fromhex(KAT["data_key"]))
    assert [f.hex() for f in sender.frames(batches)] == KAT["frames"]


def test_kat_frames_follow_the_documented_construction() -> None:
    """Recompute the stored frames from the spec alone (nonce, AAD), without sealroom.sealed."""
    aead = AESGCM(bytes.fromhex(KAT["data_key"]))
    context_digest = hashlib.sha256(bytes.fromhex(KAT["context_encoded"])).digest()
    for seq, payload_hex in enumerate(KAT["payloads"]):
        flag = 1 if seq == len(KAT["payloads"]) - 1 else 0
        nonce = b"\x00" * 4 + seq.to_bytes(8, "big")
        aad = b"sealroom/v1/frame" + context_digest + seq.to_bytes(8, "big") + bytes([flag])
        frame = bytes([flag]) + aead.encrypt(nonce, bytes.fromhex(payload_hex), aad)
        assert frame.hex() == KAT["frames"][seq]


def test_kat_stored_header_opens_to_known_key_and_batches() -> None:
    from cryptography.hazmat.primitives import hpke

    job_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(KAT["job_private_key"]))
    header = StreamHeader.from_bytes(bytes.fromhex(KAT["header"]))
    assert header.to_bytes().hex() == KAT["header"]
    assert header.context == _kat_context()
    assert header.schema.hex() == KAT["schema"]

    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info = bytes.fromhex(KAT["hpke_info"])
    assert suite.decrypt(header.encapsulated_key, job_key, info=info).hex() == KAT["data_key"]

    received = OpeningStream(header, job_key)
    frames = [bytes.fromhex(f) for f in KAT["frames"]]
    assert received.open(frames[0]).to_pybytes().hex() == KAT["payloads"][0]
    last = received.open_batch(frames[1])
    received.close()
    assert last is not None and last.equals(_kat_batches()[1])
    got = open_stream(header, frames, job_key)
    assert len(got) == 2 and all(g.equals(e) for g, e in zip(got, _kat_batches(), strict=True))


# --- authentication failures --------------------------------------------------------------------


def _tampered_streams() -> dict[str, tuple[StreamHeader, list[bytes], X25519PrivateKey]]:
    """Every way to break a stream; each must fail open_stream with IntegrityError."""
    header, frames = _seal()
    other_party_header, other_party = _seal(context=_context(party="bank_b"))
    other_job_header, other_job = _seal(context=_context(job_id="job-2"))
    shared = b"\x42" * 32  # same data key on purpose: the AAD alone must keep streams apart
    same_key_header, same_key = _seal(data_key=shared)
    _, same_key_party = _seal(context=_context(party="bank_b"), data_key=shared)
    _, same_key_job = _seal(context=_context(job_id="job-2"), data_key=shared)
    _, same_key_dataset = _seal(context=_context(dataset="cards"), data_key=shared)

    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    no_final = [sender.seal_batch(b, final=False) for b in TABLE.to_batches(max_chunksize=250)]

    other_schema = pa.schema([("id", pa.int64())])
    relabelled_schema = dataclasses.replace(
        header,
        context=_context(schema=other_schema),
        schema=other_schema.serialize().to_pybytes(),
    )
    last = len(frames) - 1
    return {
        "ciphertext byte": (header, [frames[0], _flip(frames[1], 10), *frames[2:]], JOB_KEY),
        "tag byte": (header, [*frames[:last], _flip(frames[last], len(frames[last]) - 1)], JOB_KEY),
        "final flag cleared": (header, [*frames[:last], _flip(frames[last], 0)], JOB_KEY),
        "final flag set early": (header, [_flip(frames[0], 0), *frames[1:]], JOB_KEY),
        "reserved flag bit": (header, [_flip(frames[0], 0, 0x02), *frames[1:]], JOB_KEY),
        "replayed frame": (header, [frames[0], frames[0], *frames[1:]], JOB_KEY),
        "reordered frames": (header, [frames[1], frames[0], *frames[2:]], JOB_KEY),
        "truncated stream": (header, frames[:last], JOB_KEY),
        "no frames at all": (header, [], JOB_KEY),
        "no final frame": (sender.header, no_final, JOB_KEY),
        "frame after final": (header, [*frames, frames[0]], JOB_KEY),
        "frame from another party": (header, [frames[0], other_party[1], *frames[2:]], JOB_KEY),
        "frame from another job": (header, [frames[0], other_job[1], *frames[2:]], JOB_KEY),
        "same key, other party": (same_key_header, [same_key[0], same_key_party[1], *same_key[2:]], JOB_KEY),
        "same key, other job": (same_key_header, [same_key[0], same_key_job[1], *same_key[2:]], JOB_KEY),
        "same key, other dataset": (
            same_key_header,
            [same_key[0], same_key_dataset[1], *same_key[2:]],
            JOB_KEY,
        ),
        "header of another party": (other_party_header, frames, JOB_KEY),
        "header of another job": (other_job_header, frames, JOB_KEY),
        "header relabelled to another job": (
            dataclasses.replace(header, context=_context(job_id="job-2")),
            frames,
            JOB_KEY,
        ),
        "header relabelled to another party": (
            dataclasses.replace(header, context=_context(party="bank_b")),
            frames,
            JOB_KEY,
        ),
        "header plan hash changed": (
            dataclasses.replace(header, context=dataclasses.replace(header.context, plan_hash=b"\x00" * 32)),
            frames,
            JOB_KEY,
        ),
        "schema bytes swapped": (
            dataclasses.replace(header, schema=other_schema.serialize().to_pybytes()),
            frames,
            JOB_KEY,
        ),
        "schema and its hash swapped": (relabelled_schema, frames, JOB_KEY),
        "encapsulated key flipped": (
            dataclasses.replace(header, encapsulated_key=_flip(header.encapsulated_key, 40)),
            frames,
            JOB_KEY,
        ),
        "wrong private key": (header, frames, OTHER_KEY),
        "empty frame": (header, [b"", *frames], JOB_KEY),
        "frame shorter than a tag": (header, [frames[0][:16], *frames[1:]], JOB_KEY),
        "frame cut by one byte": (header, [frames[0][:-1], *frames[1:]], JOB_KEY),
        "frame with a byte appended": (header, [frames[0] + b"\x00", *frames[1:]], JOB_KEY),
    }


TAMPERED = _tampered_streams()


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_open_stream_rejects(case: str) -> None:
    header, frames, key = TAMPERED[case]
    with pytest.raises(IntegrityError):
        open_stream(header, frames, key)


def test_integrity_error_is_one_message_for_every_failure_and_leaks_nothing() -> None:
    errors: list[IntegrityError] = []
    for header, frames, key in TAMPERED.values():
        with pytest.raises(IntegrityError) as info:
            open_stream(header, frames, key)
        errors.append(info.value)
    with pytest.raises(IntegrityError) as info:
        StreamHeader.from_bytes(b"garbage")
    errors.append(info.value)
    with pytest.raises(IntegrityError) as info:
        StreamContext.decode(b"garbage")
    errors.append(info.value)

    assert len({(type(e), str(e), e.message, repr(e.args)) for e in errors}) == 1
    assert all(e.details == {} for e in errors)
    assert all(e.__cause__ is None and e.__suppress_context__ for e in errors)
    # The payload of the stream carries SECRET; no error, however it failed, may echo it.
    assert SECRET.encode() in TABLE.to_batches()[0].serialize().to_pybytes()
    for e in errors:
        text = f"{e} {e!r} {e.to_json()}"
        assert SECRET not in text and "seg-" not in text and "bank_" not in text


def test_stream_is_dead_after_first_failure() -> None:
    header, frames = _seal()
    received = OpeningStream(header, JOB_KEY)
    with pytest.raises(IntegrityError):
        received.open(_flip(frames[0], 5))
    for frame in frames:  # the genuine frames, in order: still refused
        with pytest.raises(IntegrityError):
            received.open(frame)
    assert not received.finished
    with pytest.raises(IntegrityError):
        received.close()


def test_frame_after_final_is_refused_and_kills_the_stream() -> None:
    header, frames = _seal()
    received = OpeningStream(header, JOB_KEY)
    for frame in frames:
        received.open(frame)
    assert received.finished
    with pytest.raises(IntegrityError):
        received.open(frames[-1])
    assert not received.finished
    with pytest.raises(IntegrityError):
        received.close()


def test_close_without_final_frame_is_truncation() -> None:
    header, frames = _seal()
    received = OpeningStream(header, JOB_KEY)
    for frame in frames[:-1]:
        assert received.open_batch(frame) is not None
    assert not received.finished
    with pytest.raises(IntegrityError):
        received.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"not an arrow message",
        pa.schema([("id", pa.int64())]).serialize().to_pybytes(),
        pa.record_batch({"x": pa.array([1.5])}).serialize().to_pybytes()[:40],
    ],
    ids=["garbage", "schema message", "cut batch"],
)
def test_authentic_payload_that_is_not_a_batch_is_refused(payload: bytes) -> None:
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    frame = sender.seal(payload, final=True)
    with pytest.raises(IntegrityError):
        open_stream(sender.header, [frame], JOB_KEY)


def test_authentic_empty_non_final_payload_is_not_a_batch() -> None:
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    frames = [sender.seal(b"", final=False), sender.seal(b"", final=True)]
    with pytest.raises(IntegrityError):
        open_stream(sender.header, frames, JOB_KEY)
    received = OpeningStream(sender.header, JOB_KEY)  # open() itself carries opaque payloads
    assert received.open(frames[0]).size == 0


def test_authentic_batch_with_out_of_range_offsets_is_refused() -> None:
    """A party holds the data key, so it can seal a malformed batch: it must not reach the engine."""
    batch = pa.record_batch({"id": [7, 8, 9], "age": [40, 41, 42], "exposure": [1.0] * 3, "segment": list("abc")}).cast(
        SCHEMA
    )
    payload = batch.serialize().to_pybytes()
    offsets = b"".join(i.to_bytes(4, "little") for i in range(4))  # segment: 0, 1, 2, 3
    assert payload.count(offsets + b"abc") == 1
    forged = payload.replace(offsets + b"abc", offsets[:12] + (1 << 30).to_bytes(4, "little") + b"abc")
    assert pa.ipc.read_record_batch(pa.py_buffer(forged), SCHEMA).num_rows == 3  # parses; invalid
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    with pytest.raises(IntegrityError):
        open_stream(sender.header, [sender.seal(forged, final=True)], JOB_KEY)


def _forge_kat_frame(seq: int, flag: int, payload: bytes) -> bytes:
    """What a sender holding the data key can build by hand, outside SealingStream's rules."""
    digest = hashlib.sha256(bytes.fromhex(KAT["context_encoded"])).digest()
    aad = b"sealroom/v1/frame" + digest + seq.to_bytes(8, "big") + bytes([flag])
    nonce = b"\x00" * 4 + seq.to_bytes(8, "big")
    return bytes([flag]) + AESGCM(bytes.fromhex(KAT["data_key"])).encrypt(nonce, payload, aad)


def _kat_open() -> tuple[OpeningStream, list[bytes]]:
    job_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(KAT["job_private_key"]))
    received = OpeningStream(StreamHeader.from_bytes(bytes.fromhex(KAT["header"])), job_key)
    return received, [bytes.fromhex(f) for f in KAT["frames"]]


def test_authentic_frame_after_final_is_refused() -> None:
    received, frames = _kat_open()
    for frame in frames:
        received.open(frame)
    with pytest.raises(IntegrityError):
        received.open(_forge_kat_frame(len(frames), 0, bytes.fromhex(KAT["payloads"][0])))


@pytest.mark.parametrize("flag", [0x02, 0x03, 0x80, 0xFF])
def test_authentic_frame_with_reserved_flag_bits_is_refused(flag: int) -> None:
    received, _ = _kat_open()
    assert received.open(_forge_kat_frame(0, 0, b"ok")).to_pybytes() == b"ok"
    with pytest.raises(IntegrityError):
        received.open(_forge_kat_frame(1, flag, b"x"))


def test_receiver_refuses_past_frame_limit() -> None:
    header, frames = _seal()
    received = OpeningStream(header, JOB_KEY)
    received._seq = 2**32  # white-box: sealing 2**32 frames is not a unit test
    with pytest.raises(IntegrityError):
        received.open(frames[0])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        b"\xff\xff\xff\xff",
        bytes.fromhex(KAT["header"])[:-1],
        bytes.fromhex(KAT["header"]) + b"\x00",
        bytes.fromhex(KAT["header"]).replace(b"stream-header", b"stream-headex"),
        bytes.fromhex(KAT["header"]).replace(SUITE_ID.encode(), b"x25519-hkdfsha256-chacha20p"),
        bytes.fromhex(KAT["header"]).replace(b"job-kat-0001", b"job-kat-\xff001"),
        bytes.fromhex(KAT["context_encoded"]),
    ],
    ids=[
        "empty",
        "short prefix",
        "huge length",
        "cut",
        "trailing",
        "label",
        "suite",
        "non-utf8 job",
        "context not header",
    ],
)
def test_malformed_header_bytes(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        StreamHeader.from_bytes(data)


def test_malformed_header_field_lengths() -> None:
    header = StreamHeader.from_bytes(bytes.fromhex(KAT["header"]))
    label = b"sealroom/v1/stream-header"
    parts = [label, SUITE_ID.encode(), header.context.encode(), header.schema]
    for enc in (header.encapsulated_key[:-1], header.encapsulated_key + b"\x00"):
        data = b"".join(len(p).to_bytes(4, "big") + p for p in [*parts, enc])
        with pytest.raises(IntegrityError):
            StreamHeader.from_bytes(data)
    good = b"".join(len(p).to_bytes(4, "big") + p for p in [*parts, header.encapsulated_key])
    assert StreamHeader.from_bytes(good) == header


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex(KAT["context_encoded"])[:-1],
        bytes.fromhex(KAT["context_encoded"]) + b"\x00",
        bytes.fromhex(KAT["context_encoded"]).replace(b"context", b"kontext"),
        bytes.fromhex(KAT["context_encoded"]).replace(b"\x00\x00\x00\x06bank_a", b"\x00\x00\x00\x00"),
        bytes.fromhex(KAT["context_encoded"]).replace(b"bank_a", b"bank\xed\xa0"),
    ],
    ids=["empty", "cut", "trailing", "label", "empty party", "non-utf8"],
)
def test_malformed_context_bytes(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        StreamContext.decode(data)


def test_header_from_another_job_key_pair() -> None:
    """A header sealed to job 2's key cannot be opened with job 1's key, frames notwithstanding."""
    other_header, _ = _seal(context=_context(job_id="job-2"), key=OTHER_KEY)
    with pytest.raises(IntegrityError):
        OpeningStream(other_header, JOB_KEY)


# --- misuse: TypeError / ValueError -------------------------------------------------------------

_GOOD: dict[str, Any] = {
    "job_id": "job-1",
    "party": "bank_a",
    "dataset": "loans",
    "schema_hash": b"\x01" * 32,
    "plan_hash": b"\x02" * 32,
    "evidence_hash": b"\x03" * 32,
}


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("job_id", b"job-1", TypeError),
        ("job_id", None, TypeError),
        ("party", 7, TypeError),
        ("dataset", ["loans"], TypeError),
        ("job_id", "", ValueError),
        ("party", "", ValueError),
        ("dataset", "x" * 1025, ValueError),
        ("dataset", "\ud800", ValueError),
        ("schema_hash", "00" * 32, TypeError),
        ("plan_hash", bytearray(32), TypeError),
        ("evidence_hash", None, TypeError),
        ("schema_hash", b"\x00" * 31, ValueError),
        ("plan_hash", b"\x00" * 33, ValueError),
        ("evidence_hash", b"", ValueError),
    ],
)
def test_stream_context_field_validation(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        StreamContext(**{**_GOOD, field: value})  # type: ignore[arg-type]


def test_stream_context_accepts_limits() -> None:
    context = StreamContext(**{**_GOOD, "dataset": "é" * 512})
    assert StreamContext.decode(context.encode()) == context


def test_hpke_info_validation() -> None:
    with pytest.raises(TypeError):
        hpke_info(b"job", PLAN, EVIDENCE)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        hpke_info("job", PLAN[:31], EVIDENCE)
    with pytest.raises(TypeError):
        hpke_info("job", PLAN, EVIDENCE.hex())  # type: ignore[arg-type]
    assert hpke_info("job-1", PLAN, EVIDENCE) != hpke_info("job-2", PLAN, EVIDENCE)
    assert hpke_info("job-1", PLAN, EVIDENCE) != hpke_info("job-1", EVIDENCE, PLAN)


def test_header_field_validation() -> None:
    context = _context()
    with pytest.raises(TypeError):
        StreamHeader(context=context.encode(), schema=b"", encapsulated_key=b"\x00" * 80)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        StreamHeader(context=context, schema=SCHEMA, encapsulated_key=b"\x00" * 80)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StreamHeader(context=context, schema=b"", encapsulated_key=b"\x00" * 48)


def test_sealing_stream_misuse() -> None:
    public = JOB_KEY.public_key()
    with pytest.raises(TypeError):
        SealingStream(_context(), SCHEMA, JOB_KEY)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SealingStream(_context(), SCHEMA, Ed25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema_hash"):
        SealingStream(_context(schema=pa.schema([("id", pa.int64())])), SCHEMA, public)
    dict_schema = pa.schema([("segment", pa.dictionary(pa.int32(), pa.string()))])
    with pytest.raises(ValueError, match="dictionary"):
        SealingStream(_context(schema=dict_schema), dict_schema, public)
    with pytest.raises(ValueError):
        SealingStream(_context(), SCHEMA, public, _data_key=b"\x00" * 16)
    with pytest.raises(TypeError):
        SealingStream(_context(), SCHEMA, public, _data_key="00" * 32)  # type: ignore[arg-type]

    sender = SealingStream(_context(), SCHEMA, public)
    with pytest.raises(TypeError):
        sender.seal(b"x", final=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sender.seal("text", final=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema"):
        sender.seal_batch(pa.record_batch({"id": [1]}), final=False)
    sender.seal(b"last", final=True)
    with pytest.raises(ValueError, match="final"):
        sender.seal(b"more", final=False)


def test_sender_refuses_past_frame_limit() -> None:
    sender = SealingStream(_context(), SCHEMA, JOB_KEY.public_key())
    sender._seq = 2**32  # white-box: sealing 2**32 frames is not a unit test
    with pytest.raises(ValueError, match="frames"):
        sender.seal(b"x", final=True)


def test_opening_stream_misuse_is_a_type_error() -> None:
    header, frames = _seal()
    with pytest.raises(TypeError):
        OpeningStream(header.to_bytes(), JOB_KEY)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        OpeningStream(header, JOB_KEY.public_key())  # type: ignore[arg-type]
    received = OpeningStream(header, JOB_KEY)
    with pytest.raises(TypeError):
        received.open(frames[0].hex())  # type: ignore[arg-type]
    assert received.open_batch(frames[0]) is not None  # a type error does not consume a frame


def test_module_imports_no_component_and_no_pandas() -> None:
    code = (
        "import sys, sealroom.sealed; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "{'pandas', 'coordinator', 'connectors', 'enclave_worker', 'mpc', 'mpyc', 'duckdb'}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- properties ---------------------------------------------------------------------------------

SMALL = _mixed_table(60)
_SEALED_SMALL = _seal(SMALL.to_batches(max_chunksize=20))
_FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_property_any_split_round_trips(cuts: list[int]) -> None:
    bounds = sorted({0, 60, *cuts})
    batches = [SMALL.slice(a, b - a).combine_chunks().to_batches()[0] for a, b in zip(bounds, bounds[1:])]
    header, frames = _seal(batches)
    assert len(frames) == len(batches)
    got = open_stream(header, frames, JOB_KEY)
    assert pa.Table.from_batches(got, schema=SCHEMA).equals(SMALL)


@_FAST
@given(st.data())
def test_property_any_single_byte_flip_in_any_frame_is_refused(data: st.DataObject) -> None:
    header, frames = _SEALED_SMALL
    index = data.draw(st.integers(min_value=0, max_value=len(frames) - 1))
    position = data.draw(st.integers(min_value=0, max_value=len(frames[index]) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tampered = list(frames)
    tampered[index] = _flip(frames[index], position, mask)
    with pytest.raises(IntegrityError):
        open_stream(header, tampered, JOB_KEY)


@_FAST
@given(st.data())
def test_property_any_single_byte_flip_in_the_header_is_refused(data: st.DataObject) -> None:
    header, frames = _SEALED_SMALL
    raw = header.to_bytes()
    position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(IntegrityError):
        open_stream(StreamHeader.from_bytes(_flip(raw, position, mask)), frames, JOB_KEY)
