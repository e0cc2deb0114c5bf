"""Audit: the transparency log, release receipts, audit events, the record of processing and the
renderers of all three.

Imports only the kernel and ``sealroom.planning``.
"""
