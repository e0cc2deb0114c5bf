"""Generated protobuf and gRPC stubs for the sealroom.v1 protocol (see proto/). Do not edit."""
