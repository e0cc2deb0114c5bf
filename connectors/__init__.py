"""The data owner's side of Sealroom.

Everything here runs on a data owner's machine, next to the raw rows: the sources that read them
(:mod:`connectors.sources`), and the party agent that verifies enclave evidence, approves plans,
seals and streams projected batches, and runs MPC players. Only what a plan asks for, sealed to an
attested enclave or secret-shared, ever leaves this package.
"""
