"""Wire constants shared by the senders and the receiver of sealed streams (docs/wire.md).

A sealed stream is a raw client-streaming gRPC method (not in a .proto service: its messages are
sealed frames, not protobuf), called by a party agent and served by the enclave worker; the stream
header and the owner's signature over it travel as binary request metadata.
"""

from __future__ import annotations

DATA_SERVICE = "sealroom.v1.EnclaveData"
UPLOAD_METHOD = "Upload"
UPLOAD_PATH = f"/{DATA_SERVICE}/{UPLOAD_METHOD}"
# sealroom.sealed.StreamHeader.to_bytes()
HEADER_METADATA_KEY = "sealroom-stream-header-bin"
# the owner's Ed25519 signature over the header (sealroom.signing.sign_stream_header)
SIGNATURE_METADATA_KEY = "sealroom-stream-signature-bin"
