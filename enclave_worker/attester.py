"""How this worker obtains attestation evidence.

Only the simulated attester exists today (no TEE on this machine): it signs reports with a key
certified by the dev root from ``sealroom dev init``, and everything it produces is marked
simulated. Real attesters (configfs-tsm for SEV-SNP/TDX, NSM for Nitro, Gramine for SGX) plug in
behind the same ``attest`` call.
"""

from __future__ import annotations

import logging
from typing import Protocol

from enclave_worker.config import EnclaveConfig
from sealroom.attestation import Evidence, SimulatedAttester, enclave_measurement, load_dev_root
from sealroom.errors import ConfigError

log = logging.getLogger(__name__)


class Attester(Protocol):
    format: str
    simulated: bool
    measurement: str

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence: ...


class _Simulated:
    format = "simulated"
    simulated = True

    def __init__(self, config: EnclaveConfig):
        if config.dev_root is None:
            raise ConfigError("the simulated attester needs enclave.dev_root (run `sealroom dev init`)")
        self.measurement = enclave_measurement(config.measured())
        self._attester = SimulatedAttester(load_dev_root(config.dev_root), measurement=self.measurement)
        log.warning("SIMULATED attestation: this worker runs in no TEE; its evidence is marked simulated")

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        return self._attester.attest(report_data=report_data, nonce=nonce)


def make_attester(config: EnclaveConfig) -> Attester:
    if config.attester == "simulated":
        return _Simulated(config)
    raise ConfigError(f"attester {config.attester!r} is not supported by this build")
