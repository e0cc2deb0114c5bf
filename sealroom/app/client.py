"""The analyst's Python client.

    >>> import sealroom
    >>> client = sealroom.Client("127.0.0.1:7100", "srt_...", ca="ca.crt")  # coordinator, token, its CA
    >>> client.datasets()                                      # what each owner publishes: schema and policy
    >>> print(client.explain("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"))
    >>> print(client.explain("SELECT segment, SUM(amount) FROM bank_a.loans GROUP BY segment", epsilon=0.2))
    >>> query = client.submit("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment")
    >>> query.status()["status"]                               # planning, awaiting_approval, running, released...
    >>> result = query.result()                                # waits; raises if the query was refused or failed
    >>> result.to_pandas()                                     # the released cells
    >>> result.suppressed_frame()                              # the suppressed cells: group keys and rule, no value
    >>> result.to_pandas(with_suppressed=True)                 # both: suppressed cells as missing values
    >>> result.ci95, result.privacy                            # dp mode: each noisy cell's 95 % half-width, the cost

Over datasets whose owners chose differential privacy (``[privacy] mode = "dp"``), ``epsilon=``
(per call, or ``Client(epsilon=...)`` for every call) is what a query spends of each owner's budget;
left out: 0.5, or less where an owner caps one query lower. A query over threshold datasets only is
refused when given an epsilon (it would buy nothing): leave it out there.

A :class:`~sealroom.app.result.Result` holds a query's outcome. Refusals and failures raise
:class:`~sealroom.errors.SealroomError` subclasses carrying the public reason: ``err.message``, and
``err.details`` naming the party, dataset, column and rule where known, and the smallest change that
would make the query acceptable (``suggestion``). A policy refusal is a
:class:`~sealroom.errors.PolicyRefusalError` (also a ``PermissionError``), a query Sealroom does not
run an :class:`~sealroom.errors.InvalidQueryError` (also a ``ValueError``), an owner's rejection an
:class:`~sealroom.errors.ApprovalError`, a job that ended without a release a
:class:`~sealroom.errors.JobFailedError`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa

from sealroom import pki
from sealroom.app.result import Result
from sealroom.auth import bearer
from sealroom.errors import ConfigError, InvalidQueryError, SealroomError, UnavailableError, from_code
from sealroom.rpc import TLSConfig, call, dial
from sealroom.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_COORDINATOR", "TERMINAL", "Client", "QueryHandle", "analyst_tls", "coordinator_address"]

TERMINAL = ("released", "refused", "failed")
DEFAULT_COORDINATOR = "127.0.0.1:7100"


def analyst_tls(ca: str | os.PathLike[str] | None, *, plaintext: bool = False) -> TLSConfig:
    """The analyst's side of the coordinator's server-only TLS: the CA to check it against (``ca``, else
    ``$SEALROOM_CA``), or plaintext when asked for explicitly (loopback only)."""
    if plaintext:
        return TLSConfig.off()
    ca = ca or os.environ.get("SEALROOM_CA") or None
    if ca is None:
        raise ConfigError(
            "the coordinator's link is TLS: give the CA that issued its certificate with --ca FILE, "
            "SEALROOM_CA=FILE or Client(ca=FILE) (a development platform's is <state dir>/tls/ca.crt, "
            "written by `sealroom dev init`); plaintext=True only for a plaintext coordinator on loopback"
        )
    path = Path(ca).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"the CA certificate {path} does not exist; give the collaboration's ca.crt with --ca, SEALROOM_CA "
            "or Client(ca=...)"
        )
    return TLSConfig(ca=path)


def coordinator_address(address: str | None = None) -> str:
    """The coordinator to call: ``address`` if given, else ``$SEALROOM_COORDINATOR``, else
    :data:`DEFAULT_COORDINATOR`."""
    return address or os.environ.get("SEALROOM_COORDINATOR") or DEFAULT_COORDINATOR


class QueryHandle:
    """A submitted query: ask for its status, wait for it, fetch its result."""

    def __init__(self, client: Client, query_id: str, *, sql: str | None = None):
        self.client = client
        self.query_id = query_id
        self.sql = sql

    def status(self) -> dict[str, Any]:
        """The query's state, see :meth:`Client.status`."""
        return self.client.status(self.query_id)

    def wait(
        self,
        timeout: float = 600.0,
        *,
        poll: float = 0.1,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """Block until the query is released, refused or failed; return that status.

        ``on_progress`` is called with the status dict whenever the state or the progress changes
        (``sealroom.app.render.ProgressDisplay`` draws it on a terminal). Raises ``TimeoutError`` after
        ``timeout`` seconds (the query keeps running; wait again or fetch it later by its id).
        """
        deadline = time.monotonic() + timeout
        last = None
        while True:
            st = self.status()
            seen = (st["status"], st["progress"], json.dumps(st["parties"], sort_keys=True))
            if on_progress is not None and seen != last:
                on_progress(st)
                last = seen
            if st["status"] in TERMINAL:
                return str(st["status"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"query {self.query_id} still {st['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def result(self, timeout: float = 600.0, *, raise_on_error: bool = True) -> Result:
        """Wait for the query, then return its :class:`Result`.

        A refused or failed query raises its error (with ``details``: party, dataset, column, rule,
        suggestion where known) unless ``raise_on_error=False``, which returns the Result with
        ``status`` and ``error`` set instead.
        """
        self.wait(timeout)
        result = self.client.result(self.query_id)
        if raise_on_error:
            result.raise_for_status()
        return result

    def to_pandas(self, timeout: float = 600.0, *, with_suppressed: bool = False) -> pd.DataFrame:
        """Shorthand for ``result(timeout).to_pandas(with_suppressed=...)``."""
        return self.result(timeout).to_pandas(with_suppressed=with_suppressed)

    def __repr__(self) -> str:
        return f"<sealroom.QueryHandle {self.query_id}>"


def _error(raw: bytes) -> SealroomError | None:
    if not raw:
        return None
    doc = json.loads(raw)
    return from_code(doc.get("code", "internal"), doc.get("message", ""), doc.get("details"))


class Client:
    """An analyst's connection to a Sealroom coordinator (gRPC).

    ``address``: the coordinator's ``HOST:PORT`` (default: ``$SEALROOM_COORDINATOR``, else
    127.0.0.1:7100). ``token``: the analyst's bearer token, as ``sealroom analyst token NAME``
    printed it (default: ``$SEALROOM_TOKEN``); the coordinator attributes every call to its owner
    and shows each analyst only their own queries. Without a token only a coordinator that runs
    without analyst authentication (development) answers, and ``analyst`` names the caller.
    ``ca``: the collaboration CA's certificate (PEM file) that issued the coordinator's certificate
    (default: ``$SEALROOM_CA``); the client checks that it reached the coordinator's identity over
    TLS. ``plaintext=True``: no TLS, for a coordinator configured ``[tls] plaintext = true`` on
    loopback only. ``timeout``: seconds for each call. ``epsilon``: what each query over dp datasets
    spends unless the call names its own (default: the platform's, 0.5 capped at the owners' limit).
    Close the client (or use it as a context manager) when done.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        analyst: str = "",
        timeout: float = 60.0,
        ca: str | os.PathLike[str] | None = None,
        plaintext: bool = False,
        epsilon: float | None = None,
    ):
        self.address = coordinator_address(address)
        self.analyst = analyst
        self.epsilon = check_epsilon(epsilon)
        self.timeout = timeout
        token = token or os.environ.get("SEALROOM_TOKEN") or None
        self._metadata = bearer(token) if token else ()
        self._tls = analyst_tls(ca, plaintext=plaintext)
        self._channel: grpc.Channel = dial(self.address, self._tls, pki.coordinator())
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        who = f", analyst={self.analyst!r}" if self.analyst else ""
        return f"<sealroom.Client {self.address}{who}>"

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return call("coordinator", method, request, timeout=self.timeout, metadata=self._metadata)
        except UnavailableError as err:
            if self._tls.plaintext:
                raise
            err.message += (
                f"; if the coordinator is running, check the TLS trust: {self._tls.ca} must be the CA that issued "
                "the coordinator's certificate (the collaboration's ca.crt; `sealroom dev init` wrote the "
                "development one), given with --ca, SEALROOM_CA or Client(ca=...)"
            )
            err.args = (err.message,)
            raise

    def datasets(self) -> list[dict[str, Any]]:
        """Every registered dataset: ``dataset`` (``party.name``), ``columns``, the owner's ``policy``
        (column roles, privacy unit, minimum group size...), ``description``, and
        ``approximate_rows`` where the owner shares it. Schemas only, never rows."""
        resp = self._call(self._stub.ListDatasets, common_pb2.Empty())
        return [
            {
                "dataset": f"{d.party}.{d.name}",
                "columns": pa.ipc.read_schema(pa.py_buffer(d.arrow_schema)).names,
                "policy": json.loads(d.policy_json),
                "description": d.description,
                **({"approximate_rows": d.approximate_rows} if d.approximate_rows else {}),
            }
            for d in resp.datasets
        ]

    def _request(self, sql: str, epsilon: float | None) -> coordinator_pb2.QueryRequest:
        eps = check_epsilon(epsilon)
        eps = self.epsilon if eps is None else eps
        return coordinator_pb2.QueryRequest(sql=sql, analyst=self.analyst, epsilon=eps or 0.0)

    def budget(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """The privacy budgets of the ``dp`` datasets (only ``dataset``, ``party.name``, when given),
        one dict per dataset and scope this analyst spends from (its own ``analyst:<name>``, or
        ``collaboration``): ``dataset``, ``scope``, ``epsilon_budget``, ``spent`` (within the current
        refresh window), ``left``, ``refresh`` and ``charges`` (released queries counted), from the
        coordinator's log. The owners' agents decide from their own ledgers, which also count
        approvals in flight, so they may refuse a little before ``left`` reaches 0."""
        request = coordinator_pb2.GetBudgetRequest(dataset=dataset or "", analyst=self.analyst)
        resp = self._call(self._stub.GetBudget, request)
        return [
            {
                "dataset": line.dataset,
                "scope": line.scope,
                "epsilon_budget": line.epsilon_budget,
                "spent": line.spent,
                "left": line.left,
                "refresh": line.refresh,
                "charges": line.charges,
            }
            for line in resp.lines
        ]

    def explain(self, sql: str, epsilon: float | None = None) -> str:
        """The plan for ``sql`` in words, without running it: stages, what each party would send,
        filters, whose approval is needed, the disclosure rules; over dp datasets, per output column
        the noise and its expected 95 % error, and what the query spends (``epsilon``, see the module
        docstring) of each owner's budget. Raises the refusal (e.g.
        :class:`~sealroom.errors.PolicyRefusalError` with ``details``) if the query is not acceptable."""
        return str(self.explain_plan(sql, epsilon)["text"])

    def explain_plan(self, sql: str, epsilon: float | None = None) -> dict[str, Any]:
        """:meth:`explain` as data: ``text``, the ``plan`` (JSON; a dp plan's ``privacy`` block holds
        its epsilon and delta) and its ``plan_hash``."""
        resp = self._call(self._stub.Explain, self._request(sql, epsilon))
        return {"text": resp.text, "plan": json.loads(resp.plan_json), "plan_hash": resp.plan_hash}

    def submit(self, sql: str, epsilon: float | None = None) -> QueryHandle:
        """Submit ``sql``; return at once with a :class:`QueryHandle`. ``epsilon``: what a query over dp
        datasets spends (see the module docstring). A query the planner refuses is recorded as
        ``refused`` (its handle's ``result()`` raises the refusal)."""
        resp = self._call(self._stub.Submit, self._request(sql, epsilon))
        return QueryHandle(self, resp.query_id, sql=sql)

    def status(self, query_id: str) -> dict[str, Any]:
        """A query's state: ``status`` (planning, awaiting_approval, pending_approval, running,
        released, refused, failed), ``progress`` (one line of text), ``parties`` (while streaming:
        per party ``bytes``, ``frames``, ``rows`` where the owner shares row counts, ``rows_total``,
        ``done``), ``approved_by``, ``awaiting``, ``error``, ``sql``, ``analyst`` and timestamps."""
        st = self._call(self._stub.GetStatus, coordinator_pb2.QueryRef(query_id=query_id))
        return _status_dict(st)

    def queries(self) -> list[dict[str, Any]]:
        """The status of every query of this analyst."""
        resp = self._call(self._stub.ListQueries, common_pb2.Empty())
        return [_status_dict(q) for q in resp.queries]

    def query(self, query_id: str) -> QueryHandle:
        """A handle on a query submitted earlier (by this analyst)."""
        return QueryHandle(self, query_id)

    def result(self, query_id: str) -> Result:
        """A query's :class:`Result` as it stands (no waiting, no raising: check ``status``)."""
        r = self._call(self._stub.GetResult, coordinator_pb2.QueryRef(query_id=query_id))
        table = None
        if r.status == "released":
            table = pa.ipc.open_stream(pa.py_buffer(r.arrow_table)).read_all()
        return Result(
            query_id=r.query_id,
            status=r.status,
            table=table,
            suppressed=json.loads(r.suppressed_json) if r.suppressed_json else [],
            plan=json.loads(r.plan_json) if r.plan_json else None,
            simulated=r.simulated,
            receipt=json.loads(r.receipt_json) if r.receipt_json else None,
            error=_error(r.error_json),
        )

    def run(self, sql: str, timeout: float = 600.0, *, epsilon: float | None = None) -> Result:
        """Submit, wait and return the :class:`Result` whatever its status (it does not raise for a
        refused or failed query; ``submit(sql).result()`` does)."""
        return self.submit(sql, epsilon).result(timeout, raise_on_error=False)


def check_epsilon(epsilon: Any) -> float | None:
    """``epsilon`` as a float, or None (the default). Not a number: TypeError; not finite or not
    above 0: :class:`~sealroom.errors.InvalidQueryError` (a ValueError)."""
    if epsilon is None:
        return None
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise TypeError(f"epsilon must be a number such as 0.5, not {type(epsilon).__name__}")
    if not math.isfinite(epsilon) or not epsilon > 0:
        raise InvalidQueryError(
            f"epsilon must be a number greater than 0, such as 0.5 (got {epsilon!r})",
            details={"rule": "epsilon", "suggestion": "epsilon=0.5, or leave it out for the default"},
        )
    return float(epsilon)


def parse_progress(raw: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """Split a query's ``progress`` into its line of text and its per-party stream progress (the
    coordinator writes a JSON document while the parties stream, plain text otherwise)."""
    if raw.startswith("{"):
        try:
            doc = json.loads(raw)
        except ValueError:
            return raw, {}
        if isinstance(doc, dict):
            parties = doc.get("parties")
            return str(doc.get("text", "")), parties if isinstance(parties, dict) else {}
    return raw, {}


def _status_dict(st: coordinator_pb2.QueryStatus) -> dict[str, Any]:
    progress, parties = parse_progress(st.progress)
    return {
        "query_id": st.query_id,
        "status": st.status,
        "sql": st.sql,
        "analyst": st.analyst,
        "progress": progress,
        "parties": parties,
        "approved_by": list(st.approved_by),
        "awaiting": list(st.awaiting),
        "error": json.loads(st.error_json) if st.error_json else None,
        "created_at": st.created_at,
        "updated_at": st.updated_at,
    }
