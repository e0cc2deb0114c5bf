"""The analyst's Python client.

    >>> import sealroom
    >>> client = sealroom.Client("127.0.0.1:7100", "srt_...")  # the coordinator, your analyst token
    >>> client.datasets()                                      # what each owner publishes: schema and policy
    >>> print(client.explain("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"))
    >>> query = client.submit("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment")
    >>> query.status()["status"]                               # planning, awaiting_approval, running, released...
    >>> result = query.result()                                # waits; raises if the query was refused or failed
    >>> result.to_pandas()                                     # the released cells
    >>> result.suppressed_frame()                              # the suppressed cells: group keys and rule, no value
    >>> result.to_pandas(with_suppressed=True)                 # both: suppressed cells as missing values

Refusals and failures raise :class:`~sealroom.errors.SealroomError` subclasses carrying the public
reason: ``err.message``, and ``err.details`` naming the party, dataset, column and rule where known,
and the smallest change that would make the query acceptable (``suggestion``). A policy refusal is
a :class:`~sealroom.errors.PolicyRefusalError` (also a ``PermissionError``), a query Sealroom does not
run an :class:`~sealroom.errors.InvalidQueryError` (also a ``ValueError``), an owner's rejection an
:class:`~sealroom.errors.ApprovalError`, a job that ended without a release a
:class:`~sealroom.errors.JobFailedError`.

A released cell is an aggregate that passed every involved owner's disclosure rules; a cell that did
not is *suppressed*: the result says which group it was and which rule suppressed it, never its value.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa

from sealroom.auth import bearer
from sealroom.errors import SealroomError, from_code
from sealroom.rpc import call, open_channel
from sealroom.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Client", "QueryHandle", "Result", "TERMINAL"]

TERMINAL = ("released", "refused", "failed")
DEFAULT_COORDINATOR = "127.0.0.1:7100"
# The column that marks suppressed cells in ``Result.to_pandas(with_suppressed=True)``.
SUPPRESSED_COLUMN = "suppressed"
# A notebook shows at most this many cells of a result (to_pandas() has them all).
HTML_MAX_ROWS = 50


@dataclass(frozen=True)
class Result:
    """A query's outcome: the released table, the suppressed cells, and how it was produced.

    ``status`` is ``released``, ``refused`` or ``failed`` (or a state still in progress when fetched
    early). ``table`` holds the released cells (``None`` unless released); ``suppressed`` lists the
    cells withheld by a disclosure rule, each ``{"group": {column: key}, "rule": ..., "reason": ...}``
    and never a value; ``receipt`` is the enclave's signed record of what ran on what; ``error`` the
    refusal or failure.
    """

    query_id: str
    status: str
    table: pa.Table | None
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    simulated: bool = False
    receipt: dict[str, Any] | None = None
    error: SealroomError | None = None

    @property
    def columns(self) -> list[str]:
        """The released table's column names (empty unless released)."""
        return list(self.table.column_names) if self.table is not None else []

    def rows(self) -> list[list[Any]]:
        """The released cells as Python lists, one per row (empty unless released)."""
        if self.table is None:
            return []
        cols = [c.to_pylist() for c in self.table.columns]
        return [list(r) for r in zip(*cols, strict=True)] if cols else []

    def raise_for_status(self) -> None:
        """Raise the refusal or failure (with its details) unless the query was released."""
        if self.status != "released":
            raise self.error or SealroomError(f"query {self.query_id} is {self.status}")

    def to_arrow(self) -> pa.Table:
        """The released cells as an Arrow table; raises the refusal or failure otherwise."""
        self.raise_for_status()
        assert self.table is not None
        return self.table

    def to_pandas(self, *, with_suppressed: bool = False) -> pd.DataFrame:
        """The released cells as a DataFrame; raises the refusal or failure otherwise.

        With ``with_suppressed=True`` each suppressed cell is appended as a row holding its group
        keys and missing values (``<NA>``) everywhere else, and a ``suppressed`` column names the
        rule that withheld it (``<NA>`` for released cells). Integer columns then use pandas'
        nullable integer types so that counts stay integers. HAVING, ORDER BY and LIMIT applied to
        the released cells only, so suppressed rows come last.
        """
        table = self.to_arrow()
        if not with_suppressed:
            return table.to_pandas()
        import pandas as pd

        flag = SUPPRESSED_COLUMN if SUPPRESSED_COLUMN not in table.column_names else f"_{SUPPRESSED_COLUMN}"
        schema = pa.schema([f.with_nullable(True) for f in table.schema])
        extra = pa.table([_keys(self.suppressed, f) for f in schema], schema=schema)
        df = pa.concat_tables([table.cast(schema), extra]).to_pandas(types_mapper=_nullable_ints)
        df[flag] = pd.array([None] * table.num_rows + [s.get("rule") for s in self.suppressed], dtype="string")
        return df

    def suppressed_frame(self) -> pd.DataFrame:
        """One row per suppressed cell: its group keys (in the result's column order), the ``rule``
        that suppressed it (``min_group_size``, ``dominance``) and the ``reason`` in words. Never a
        value."""
        import pandas as pd

        keys: list[str] = []
        for s in self.suppressed:
            keys += [k for k in s["group"] if k not in keys]
        order = {c: i for i, c in enumerate(self.columns)}
        keys.sort(key=lambda k: order.get(k, len(order)))
        return pd.DataFrame(
            [
                {**{k: s["group"].get(k) for k in keys}, "rule": s.get("rule"), "reason": s["reason"]}
                for s in self.suppressed
            ],
            columns=[*keys, "rule", "reason"],
        )

    def stages(self) -> list[dict[str, Any]]:
        """The plan's stages: id, kind (``tee`` or ``mpc``) and the datasets each reads; a TEE stage
        feeding an MPC stage names it (``feeds``); an MPC stage lists its ``players``."""
        if not self.plan:
            return []
        return [
            {
                "id": s["id"],
                "kind": s["kind"],
                "inputs": [f"{i['party']}.{i['dataset']}" for i in s["inputs"]],
                **({"feeds": s["feeds"]} if "feeds" in s else {}),
                **({"players": s["mpc"]["players"]} if "mpc" in s else {}),
            }
            for s in self.plan["stages"]
        ]

    def inputs(self) -> list[dict[str, Any]]:
        """What went where, from the signed receipt: per dataset the columns sent (sealed) to the
        enclave, and the sealed frames and bytes."""
        if not self.receipt:
            return []
        # An MPC release names each dataset's player: an owner's own player (its rows never left, only
        # shares did), or in a hybrid plan the enclave's, which the rows were streamed (sealed) to.
        res = self.receipt["result"]
        streamed = {(i["party"], i["dataset"]): i for i in (res.get("feed") or res).get("inputs", []) if "frames" in i}
        out = []
        for i in res["inputs"]:
            entry: dict[str, Any] = {"dataset": f"{i['party']}.{i['dataset']}", "columns": list(i["columns"])}
            sent = streamed.get((i["party"], i["dataset"]))
            if sent is not None:
                entry.update(frames=sent["frames"], bytes=sent["bytes"])
            if "player" in i:
                entry["mpc_player"] = i["player"]
            out.append(entry)
        return out

    # -- display -----------------------------------------------------------------------------

    def _headline(self) -> str:
        if self.status == "released":
            sim = " [SIMULATED attestation: no TEE]" if self.simulated else ""
            return (
                f"query {self.query_id} released {self.table.num_rows if self.table is not None else 0} cells, "
                f"{len(self.suppressed)} suppressed{sim}"
            )
        reason = f": {self.error.message}" if self.error is not None else ""
        return f"query {self.query_id} {self.status}{reason}"

    def __repr__(self) -> str:
        return f"<sealroom.Result {self._headline()}>"

    def __str__(self) -> str:
        from sealroom.app.render import render_result

        return render_result(self)

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<p><b>{esc(self._headline())}</b></p>"]
        if self.status != "released":
            if self.error is not None and self.error.details:
                parts.append(_html_table(["detail", "value"], [[k, v] for k, v in self.error.details.items()]))
            return "\n".join(parts)
        rows = self.rows()
        parts.append(_html_table(self.columns, rows[:HTML_MAX_ROWS]))
        if len(rows) > HTML_MAX_ROWS:
            parts.append(f"<p>... and {len(rows) - HTML_MAX_ROWS:,} more cells (to_pandas() has them all)</p>")
        if self.suppressed:
            frame = self.suppressed_frame()
            parts.append(f"<p>{len(self.suppressed)} suppressed cells (no values released):</p>")
            parts.append(_html_table(list(frame.columns), frame.astype(object).values.tolist()[:HTML_MAX_ROWS]))
        inputs = self.inputs()
        if inputs:
            sent = "".join(
                f"<li>{esc(i['dataset'])}: {esc(', '.join(i['columns']))} ("
                + "; ".join(
                    ([f"{i['frames']} sealed frames to the enclave"] if "frames" in i else [])
                    + ([f"held by MPC player {i['mpc_player']}"] if "mpc_player" in i else [])
                )
                + ")</li>"
                for i in inputs
            )
            parts.append(f"<details><summary>what went where</summary><ul>{sent}</ul></details>")
        return "\n".join(parts)


def _keys(suppressed: list[dict[str, Any]], f: pa.Field) -> pa.Array:
    """A suppressed cells' column: its group key where the column is one, else nulls."""
    values = [s["group"].get(f.name) for s in suppressed]
    if all(v is None for v in values):
        return pa.nulls(len(values), f.type)
    try:
        return pa.array(values, type=f.type)
    except (pa.ArrowException, TypeError, ValueError):
        try:  # keys travel as JSON: a date or decimal key comes back as text
            return pa.array([None if v is None else str(v) for v in values]).cast(f.type)
        except (pa.ArrowException, TypeError, ValueError):
            return pa.nulls(len(values), f.type)


def _nullable_ints(t: pa.DataType) -> Any:
    import pandas as pd

    if pa.types.is_integer(t):
        return pd.api.types.pandas_dtype(str(t).replace("int", "Int").replace("uInt", "UInt"))
    return None


def _html_table(columns: list[str], rows: list[list[Any]]) -> str:
    from sealroom.app.render import cell_text

    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell_text(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    ``timeout``: seconds for each call. Close the client (or use it as a context manager) when done.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        analyst: str = "",
        timeout: float = 60.0,
    ):
        self.address = address or os.environ.get("SEALROOM_COORDINATOR") or DEFAULT_COORDINATOR
        self.analyst = analyst
        self.timeout = timeout
        token = token or os.environ.get("SEALROOM_TOKEN") or None
        self._metadata = bearer(token) if token else ()
        self._channel: grpc.Channel = open_channel(self.address)
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
        return call("coordinator", method, request, timeout=self.timeout, metadata=self._metadata)

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

    def explain(self, sql: str) -> str:
        """The plan for ``sql`` in words, without running it: stages, what each party would send,
        filters, whose approval is needed, the disclosure rules. Raises the refusal (e.g.
        :class:`~sealroom.errors.PolicyRefusalError` with ``details``) if the query is not acceptable."""
        return str(self.explain_plan(sql)["text"])

    def explain_plan(self, sql: str) -> dict[str, Any]:
        """:meth:`explain` as data: ``text``, the ``plan`` (JSON) and its ``plan_hash``."""
        resp = self._call(self._stub.Explain, coordinator_pb2.QueryRequest(sql=sql, analyst=self.analyst))
        return {"text": resp.text, "plan": json.loads(resp.plan_json), "plan_hash": resp.plan_hash}

    def submit(self, sql: str) -> QueryHandle:
        """Submit ``sql``; return at once with a :class:`QueryHandle`. A query the planner refuses is
        recorded as ``refused`` (its handle's ``result()`` raises the refusal)."""
        resp = self._call(self._stub.Submit, coordinator_pb2.QueryRequest(sql=sql, analyst=self.analyst))
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

    def run(self, sql: str, timeout: float = 600.0) -> Result:
        """Submit, wait and return the :class:`Result` whatever its status (it does not raise for a
        refused or failed query; ``submit(sql).result()`` does)."""
        return self.submit(sql).result(timeout, raise_on_error=False)


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
