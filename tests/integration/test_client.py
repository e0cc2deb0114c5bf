"""The analyst's Python client against a real local platform (``sealroom.local_platform``: enclave
worker, coordinator and party agents as processes on 127.0.0.1, the demo's synthetic data): the
DataFrame of released cells, suppressed cells shown without values, refusals as exceptions carrying
their details, waiting, credentials, and the platform's own start and stop."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

import sealroom
from sealroom.app.demo import BANK
from sealroom.app.demo_data import bank_tables
from sealroom.errors import AuthenticationError, InvalidQueryError, PolicyRefusalError, SealroomError

pytestmark = pytest.mark.slow

DEFAULTS = BANK.queries[0].sql  # shared customers by segment and rating: two cells suppressed
PER_CUSTOMER = BANK.queries[2].sql  # refused: groups by the privacy unit
ROW_LEVEL = "SELECT a.customer_id, a.exposure FROM bank_a.exposures a"
BANK_A_ONLY = "SELECT segment, COUNT(*) AS n FROM bank_a.exposures GROUP BY segment ORDER BY segment"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with sealroom.local_platform("bank", state_dir=tmp_path_factory.mktemp("bank")) as p:
        yield p


@pytest.fixture(scope="module")
def defaults(platform):
    query = platform.client.submit(DEFAULTS)
    assert platform.approve_pending(query) == ["bank_c"]  # bank_c's owner approves by hand
    return query.result()


def test_datasets_show_schemas_and_policies_never_rows(platform):
    ds = platform.client.datasets()
    assert [d["dataset"] for d in ds] == ["bank_a.exposures", "bank_b.exposures", "bank_c.exposures"]
    assert ds[0]["columns"] == ["customer_id", "segment", "rating", "exposure", "loans", "defaulted"]
    assert ds[0]["policy"]["privacy_unit"] == "customer_id" and ds[0]["policy"]["min_group_size"] == 5
    assert ds[2]["policy"]["approval"] == "manual"


def test_explain_shows_the_plan_and_raises_refusals_with_details(platform):
    text = platform.client.explain(BANK_A_ONLY)
    assert "bank_a.exposures: customer_id, segment" in text and "Approvals needed from: bank_a" in text
    with pytest.raises(PolicyRefusalError) as refused:
        platform.client.explain(PER_CUSTOMER)
    err = refused.value
    assert isinstance(err, PermissionError) and isinstance(err, SealroomError)
    d = err.details
    assert (d["party"], d["dataset"], d["column"], d["rule"]) == ("bank_b", "exposures", "customer_id", "column_role")
    assert d["suggestion"].startswith("group by a dimension such as segment")
    with pytest.raises(InvalidQueryError, match="row-level") as row_level:
        platform.client.explain(ROW_LEVEL)
    assert isinstance(row_level.value, ValueError)


def test_released_cells_as_a_dataframe(defaults):
    df = defaults.to_pandas()
    assert list(df.columns) == ["segment", "rating", "shared_customers", "total_exposure", "default_rate"]
    cells = set(zip(df["segment"], df["rating"], strict=True))
    assert ("corporate", "CCC") not in cells and ("private", "A") not in cells
    assert len(df) == 9 and (df["shared_customers"] >= 5).all()
    assert defaults.to_arrow().equals(defaults.table)
    # The same numbers DuckDB computes over the pooled data directly.
    con = duckdb.connect()
    for bank, table in bank_tables().items():
        con.register(bank, table)
    want = con.sql(
        "SELECT a.segment, a.rating, COUNT(*) FROM bank_a a JOIN bank_b b ON a.customer_id = b.customer_id "
        "JOIN bank_c c ON a.customer_id = c.customer_id GROUP BY ALL ORDER BY 1, 2"
    ).fetchall()
    released = {(s, r): n for s, r, n in zip(df["segment"], df["rating"], df["shared_customers"], strict=True)}
    assert released == {(s, r): n for s, r, n in want if (s, r) not in (("corporate", "CCC"), ("private", "A"))}


def test_suppressed_cells_are_visible_without_values(defaults):
    # segment and rating declare no public domain in the demo's policy: the suppressed cells are
    # counted and explained, their keys not shown.
    frame = defaults.suppressed_frame()
    assert list(frame.columns) == ["rule", "reason"]
    assert frame["rule"].tolist() == ["dominance", "min_group_size"]
    both = defaults.to_pandas(with_suppressed=True)
    assert list(both.columns) == [*defaults.columns, "suppressed"]
    assert len(both) == 11
    released, withheld = both.iloc[:9], both.iloc[9:]
    assert released["suppressed"].isna().all()
    assert withheld["suppressed"].tolist() == ["dominance", "min_group_size"]
    assert withheld[["segment", "rating"]].isna().all().all()
    assert withheld[["shared_customers", "total_exposure", "default_rate"]].isna().all().all()
    # Counts stay integers (nullable) next to the missing values.
    assert both["shared_customers"].dtype == pd.Int64Dtype()
    assert both.iloc[:9].drop(columns="suppressed").astype(object).values.tolist() == (
        defaults.to_pandas().astype(object).values.tolist()
    )


def test_displays_name_suppressed_cells_but_never_their_values(defaults):
    con = duckdb.connect()
    for bank, table in bank_tables().items():
        con.register(bank, table)
    _, total = con.sql(
        "SELECT COUNT(*), SUM(a.exposure + b.exposure + c.exposure) FROM bank_a a "
        "JOIN bank_b b ON a.customer_id = b.customer_id JOIN bank_c c ON a.customer_id = c.customer_id "
        "WHERE a.segment = 'private'"
    ).fetchall()[0]
    html, text = defaults._repr_html_(), str(defaults)
    for shown in (html, text, repr(defaults)):
        assert "2 suppressed" in shown or "suppressed 2 cells" in shown
    assert "dominance" in html and "<table>" in html
    assert "CCC" not in html and "CCC" not in text  # the suppressed cell's key has no public domain
    for shown in (html, text):
        assert f"{total:,.2f}" not in shown and f"{total:.2f}" not in shown and str(int(total)) not in shown
    assert repr(defaults).startswith("<sealroom.Result ") and "SIMULATED" in repr(defaults)


def test_a_refused_query_raises_from_result_with_its_details(platform):
    query = platform.client.submit(PER_CUSTOMER)
    assert query.wait(60) == "refused"
    with pytest.raises(PolicyRefusalError) as refused:
        query.result()
    assert refused.value.details["column"] == "customer_id" and "suggestion" in refused.value.details
    # The Result itself carries the refusal; its data accessors raise it.
    result = query.result(raise_on_error=False)
    assert result.status == "refused" and result.columns == [] and result.rows() == []
    with pytest.raises(PolicyRefusalError):
        result.to_pandas()
    assert "refused" in result._repr_html_() and "column_role" in result._repr_html_()
    # Client.run keeps returning the Result, refused or not.
    assert platform.client.run(PER_CUSTOMER, timeout=60).status == "refused"


def test_wait_times_out_while_an_owner_decides_then_completes(platform):
    query = platform.client.submit(BANK.queries[1].sql)  # every bank's book: bank_c decides by hand
    with pytest.raises(TimeoutError, match=query.query_id):
        query.wait(timeout=1.0)
    st = query.status()
    assert st["status"] == "pending_approval" and st["awaiting"] == ["bank_c"]
    assert st["progress"].startswith("approvals 2/3")
    seen: list[str] = []
    assert platform.approve_pending(query) == ["bank_c"]
    assert query.wait(120, on_progress=lambda s: seen.append(s["status"])) == "released"
    assert seen[-1] == "released"
    df = query.to_pandas()
    assert "private" not in set(df["segment"])  # dominated by one customer: suppressed
    assert [q["query_id"] for q in platform.client.queries()].count(query.query_id) == 1


def test_credentials_positional_from_the_environment_and_never_shown(platform, monkeypatch):
    token = platform.cluster.token()
    address = platform.cluster.coordinator_address
    ca = platform.cluster.ca_path
    with sealroom.Client(address, token, ca=ca) as client:
        assert len(client.datasets()) == 3
        assert token not in repr(client) and address in repr(client)
    monkeypatch.setenv("SEALROOM_COORDINATOR", address)
    monkeypatch.setenv("SEALROOM_TOKEN", token)
    monkeypatch.setenv("SEALROOM_CA", str(ca))
    with sealroom.Client() as client:
        assert client.run(BANK_A_ONLY, timeout=60).status == "released"
    monkeypatch.delenv("SEALROOM_TOKEN")
    with sealroom.Client(address, "srt_" + "0" * 43) as client, pytest.raises(AuthenticationError):
        client.datasets()


def test_local_platform_stops_every_process_and_removes_its_state():
    with sealroom.local_platform("hospital") as p:
        procs = list(p.cluster.procs.values())
        state = p.state_dir
        assert len(procs) == 5 and all(proc.poll() is None for proc in procs)
        assert p.manual_parties() == []
        df = p.client.submit(
            "SELECT diagnosis, COUNT(DISTINCT patient_id) AS patients FROM hospital_north.stays GROUP BY diagnosis"
        ).to_pandas(with_suppressed=True)
        assert "prion_disease" in set(df["diagnosis"])
        rare = df[df["diagnosis"] == "prion_disease"]
        assert rare["patients"].isna().all() and rare["suppressed"].tolist() == ["min_group_size"]
    assert all(proc.poll() is not None for proc in procs)
    assert not state.exists()
    assert "stopped" in repr(p)


def test_unknown_scenario_is_a_config_error():
    from sealroom.errors import ConfigError

    with pytest.raises(ConfigError, match="bank, hospital"):
        sealroom.local_platform("insurance")
