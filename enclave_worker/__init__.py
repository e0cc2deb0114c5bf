"""The enclave worker: Sealroom's data plane inside the TEE (the trusted computing base).

It holds per-job keys in memory only, opens parties' sealed batches, loads them into DuckDB, runs
the stage it compiled itself from the approved plan, enforces the disclosure rules, signs the
result with its attested key, and wipes the job. It imports only the kernel (``sealroom``) and
grpcio, protobuf, pyarrow, duckdb, cryptography and sqlglot; never pandas, the coordinator,
connectors or MPyC (a test checks the modules a running worker has loaded).
"""
