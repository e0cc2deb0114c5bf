"""The test harness: real enclave workers, party agents and sealed streams on 127.0.0.1 for the
integration tests (``enclave``), and fake TEE devices and PKIs for the attesters (``tee_fakes``)."""
