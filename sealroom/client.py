"""The analyst's Python client.

    >>> import sealroom
    >>> client = sealroom.Client("127.0.0.1:7100", analyst="alice")
    >>> print(client.explain("SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment"))
    >>> df = client.submit("SELECT ...").result().to_pandas()

Refusals and failures raise :class:`~sealroom.errors.SealroomError` subclasses carrying the
public reason (``err.details`` names party, dataset, column, rule where known).
"""

from __future__ import annotations

import json
import time
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

TERMINAL = ("released", "refused", "failed")


@dataclass(frozen=True)
class Result:
    """A query's outcome: the released table, the suppressed cells, and how it was produced."""

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
        return list(self.table.column_names) if self.table is not None else []

    def rows(self) -> list[list[Any]]:
        if self.table is None:
            return []
        cols = [c.to_pylist() for c in self.table.columns]
        return [list(r) for r in zip(*cols, strict=True)] if cols else []

    def to_arrow(self) -> pa.Table:
        self.raise_for_status()
        assert self.table is not None
        return self.table

    def to_pandas(self) -> pd.DataFrame:
        return self.to_arrow().to_pandas()

    def suppressed_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([{**s["group"], "reason": s["reason"]} for s in self.suppressed])

    def raise_for_status(self) -> None:
        if self.status != "released":
            raise self.error or SealroomError(f"query {self.query_id} is {self.status}")

    def stages(self) -> list[dict[str, Any]]:
        if not self.plan:
            return []
        return [
            {"id": s["id"], "kind": s["kind"], "inputs": [f"{i['party']}.{i['dataset']}" for i in s["inputs"]]}
            for s in self.plan["stages"]
        ]


class QueryHandle:
    def __init__(self, client: Client, query_id: str):
        self.client = client
        self.query_id = query_id

    def status(self) -> dict[str, Any]:
        return self.client.status(self.query_id)

    def wait(self, timeout: float = 600.0, *, poll: float = 0.1, on_progress: Any = None) -> str:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            st = self.status()
            if on_progress is not None and (st["status"], st["progress"]) != last:
                on_progress(st)
                last = (st["status"], st["progress"])
            if st["status"] in TERMINAL:
                return st["status"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"query {self.query_id} still {st['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def result(self, timeout: float = 600.0) -> Result:
        self.wait(timeout)
        return self.client.result(self.query_id)


def _error(raw: bytes) -> SealroomError | None:
    if not raw:
        return None
    doc = json.loads(raw)
    return from_code(doc.get("code", "internal"), doc.get("message", ""), doc.get("details"))


class Client:
    """Talks to a coordinator over gRPC."""

    def __init__(self, address: str, *, analyst: str = "", token: str | None = None, timeout: float = 60.0):
        """``token``: the analyst's bearer token (``sealroom analyst token NAME``); the coordinator
        attributes every call to its owner. Without one, only a coordinator that runs without
        analyst authentication (development) answers, and ``analyst`` names the caller."""
        self.address = address
        self.analyst = analyst
        self.timeout = timeout
        self._metadata = bearer(token) if token else ()
        self._channel: grpc.Channel = open_channel(address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        return call("coordinator", method, request, timeout=self.timeout, metadata=self._metadata)

    def datasets(self) -> list[dict[str, Any]]:
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
        return self.explain_plan(sql)["text"]

    def explain_plan(self, sql: str) -> dict[str, Any]:
        resp = self._call(self._stub.Explain, coordinator_pb2.QueryRequest(sql=sql, analyst=self.analyst))
        return {"text": resp.text, "plan": json.loads(resp.plan_json), "plan_hash": resp.plan_hash}

    def submit(self, sql: str) -> QueryHandle:
        resp = self._call(self._stub.Submit, coordinator_pb2.QueryRequest(sql=sql, analyst=self.analyst))
        return QueryHandle(self, resp.query_id)

    def status(self, query_id: str) -> dict[str, Any]:
        st = self._call(self._stub.GetStatus, coordinator_pb2.QueryRef(query_id=query_id))
        return _status_dict(st)

    def queries(self) -> list[dict[str, Any]]:
        resp = self._call(self._stub.ListQueries, common_pb2.Empty())
        return [_status_dict(q) for q in resp.queries]

    def result(self, query_id: str) -> Result:
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
        return self.submit(sql).result(timeout)


def _status_dict(st: coordinator_pb2.QueryStatus) -> dict[str, Any]:
    return {
        "query_id": st.query_id,
        "status": st.status,
        "sql": st.sql,
        "analyst": st.analyst,
        "progress": st.progress,
        "approved_by": list(st.approved_by),
        "awaiting": list(st.awaiting),
        "error": json.loads(st.error_json) if st.error_json else None,
        "created_at": st.created_at,
        "updated_at": st.updated_at,
    }
