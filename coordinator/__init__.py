"""The coordinator: Sealroom's control plane (catalog, planner, approvals, orchestration, releases).

It is not trusted with data: it sees schemas, plans, approvals, ciphertext sizes and released
aggregates, never rows or keys. It never imports ``enclave_worker`` (a test checks the imports).
"""
