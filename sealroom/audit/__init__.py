"""Audit: the transparency log, release receipts, audit events, the record of processing and the
renderers of all of them.

- ``merkle``: RFC 6962/9162 Merkle hashing and proofs; ``notes``: C2SP signed notes, checkpoints and
  witnesses; ``entries``: the typed log entries; ``store``: where the log keeps them (SQLite);
  ``log``: the writer (:class:`~sealroom.audit.log.TransparencyLog`) and its export document;
  ``verify``: the step-by-step verifier of an export.
- ``receipts``: one countersigned receipt per release, verified offline in numbered steps;
  ``receipt_stages``: the check of one stage of it (TEE or MPC).
- ``events``: log entries in words; ``ropa``: the record of processing (GDPR Article 30);
  ``report``: every renderer (the record as Markdown and HTML, the audit report as HTML).
- ``state``: a coordinator's state directory, read-only (its published log, declaration, catalog);
  ``review``: the reviewer's commands' logic (verification options, releases and events in words).
- ``refusals``: the one ``AuditError`` shape every check raises.

Imports only the kernel and ``sealroom.planning``.
"""
