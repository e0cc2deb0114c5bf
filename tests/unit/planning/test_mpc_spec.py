"""The MPC stage's public spec: what is refused, the layout every player derives, and the result
structure (no MPyC here: these are the pure parts)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from mpc.result import SIGN_DOMAIN, MpcResult
from mpc.tls import SessionCA, generate_player_key
from sealroom.errors import InvalidQueryError, MpcError
from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Measure, Player, StageSpec

PLAYERS = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
DOMAIN = tuple((s,) for s in ("retail", "sme", "corporate"))


def spec(**kw) -> StageSpec:
    base = dict(
        session_id="s1",
        group_by=(GroupColumn("segment"),),
        domain=DOMAIN,
        aggregates=(Aggregate("n", "count"), Aggregate("total", "sum", "exposure")),
        players=PLAYERS,
        measures=(Measure("exposure", 0, 1_000_000, 2, nullable=False),),
        min_group_size=5,
    )
    base.update(kw)
    return StageSpec(**base)


def test_fewer_than_three_players_is_refused_and_helpers_make_up_the_number():
    with pytest.raises(InvalidQueryError, match="at least 3 players"):
        spec(players=PLAYERS[:2])
    s = spec(players=(*PLAYERS[:2], Player("coordinator", holds_input=False)))
    assert s.input_players == (0, 1)
    assert s.t == 1
    text = s.trust_assumption()
    assert text.startswith("semi-honest, honest majority: no 2 of the 3 players collude")
    assert "helper players holding no input: coordinator" in text
    with pytest.raises(InvalidQueryError, match="at least one player holding input"):
        spec(players=tuple(Player(f"h{i}", holds_input=False) for i in range(3)))


def test_threshold_must_stay_below_half():
    with pytest.raises(InvalidQueryError, match="threshold"):
        spec(threshold=2)  # 2t >= m for m = 3
    assert spec(players=(*PLAYERS, Player("d"), Player("e")), threshold=1).t == 1


def test_sum_of_an_undeclared_measure_is_refused():
    with pytest.raises(InvalidQueryError, match="declared as a measure with bounds") as e:
        spec(aggregates=(Aggregate("t", "sum", "amount"),))
    assert e.value.details["rule"] == "bounds" and e.value.details["column"] == "amount"


def test_unsupported_aggregates_are_refused():
    for func in ("median", "count_distinct"):
        with pytest.raises(InvalidQueryError, match="not computed by MPC stages"):
            spec(aggregates=(Aggregate("m", func, "exposure"),))


def test_bounds_that_could_overflow_are_refused_clearly():
    # A sum of squares of values up to 1e15 at 6 decimals cannot be held in 120 bits per party.
    huge = Measure("exposure", -1e15, 1e15, 6, nullable=False)
    with pytest.raises(InvalidQueryError, match="need .* bits, more than MPC stages allow") as e:
        spec(measures=(huge,), aggregates=(Aggregate("v", "var_pop", "exposure"),))
    assert e.value.details["rule"] == "overflow" and e.value.details["column"] == "exposure"
    # The same bounds without a sum of squares fit.
    assert spec(measures=(huge,), aggregates=(Aggregate("s", "sum", "exposure"),)).layout.int_bits < 120


def test_bit_lengths_cover_the_worst_case_from_declared_bounds():
    s = spec(aggregates=(Aggregate("v", "var_pop", "exposure"), Aggregate("n", "count")))
    lay = s.layout
    m = Measure("exposure", 0, 1_000_000, 2)
    worst_sumsq = 3 * s.max_rows * m.magnitude**2
    worst_numerator = (3 * s.max_rows) ** 2 * m.magnitude**2
    assert lay.int_bits > worst_sumsq.bit_length() and lay.int_bits > worst_numerator.bit_length()


def test_layout_opens_only_what_is_asked_and_divides_in_the_mpc_only_without_a_count():
    with_count = spec(aggregates=(Aggregate("n", "count"), Aggregate("a", "avg", "exposure")))
    assert with_count.layout.opened == ("rows", "s:exposure")  # AVG = SUM/COUNT, COUNT public
    assert with_count.layout.divided == ()
    alone = spec(aggregates=(Aggregate("a", "avg", "exposure"),))
    assert alone.layout.opened == () and alone.layout.divided == ("exposure",)
    nullable = spec(
        aggregates=(Aggregate("n", "count"), Aggregate("a", "avg", "exposure")),
        measures=(Measure("exposure", 0, 100, 0, nullable=True),),
    )
    # COUNT(*) does not count a nullable measure's values: its count is separate and not opened.
    assert nullable.layout.count_of("exposure") == "n:exposure"
    assert nullable.layout.divided == ("exposure",) and nullable.layout.null_flags == ("exposure",)


def test_the_comparison_is_short_because_counts_are_capped():
    lay = spec(min_group_size=10).layout
    assert (lay.cap, lay.cut) == (10, 10)
    assert lay.cmp_bits == (3 * 10).bit_length() + 1 < 8
    units = spec(threshold_on="units", unit_column="customer_id").layout
    assert (units.cap, units.cut) == (1, 1)  # some single player must hold k units
    disjoint = spec(threshold_on="units", unit_column="customer_id", units_disjoint=True).layout
    assert (disjoint.cap, disjoint.cut) == (5, 5)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6), st.integers(1, 50))
def test_capping_each_count_at_k_never_changes_the_threshold_outcome(counts, k):
    assert (sum(min(c, k) for c in counts) >= k) == (sum(counts) >= k)


def test_domain_must_be_explicit_and_well_formed():
    with pytest.raises(InvalidQueryError, match="non-empty public group domain"):
        spec(domain=())
    with pytest.raises(InvalidQueryError, match="twice"):
        spec(domain=(("a",), ("a",)))
    with pytest.raises(InvalidQueryError, match="one value per group-by column"):
        spec(domain=(("a", 1),))


def test_spec_round_trips_and_its_digest_is_stable():
    s = spec(group_by=(GroupColumn("age", bins=(0, 18, 65, 120)),), domain=(("[0, 18)",), ("[18, 65)",)))
    again = StageSpec.from_dict(s.to_dict())
    assert again == s and again.digest() == s.digest()
    assert s.group_by[0].labels() == ["[0, 18)", "[18, 65)", "[65, 120)"]
    assert spec(min_group_size=6).digest() != spec().digest()


def test_result_is_canonical_and_signable():
    s = spec()
    r = MpcResult.from_opened(s, {"pattern": [1, 0, 1], "columns": {"n": [7, 9], "total": [10.5, 20.0]}})
    assert r.as_dict() == {("retail",): {"n": 7, "total": 10.5}, ("corporate",): {"n": 9, "total": 20.0}}
    assert r.suppressed == (("sme",),)
    assert r.rule["min_group_size"] == 5 and r.rule["combine"] == "sum"
    doc = r.to_dict()
    assert doc["trust_assumption"] == s.trust_assumption() and [p["name"] for p in doc["players"]] == [
        "bank_a",
        "bank_b",
        "bank_c",
    ]
    assert r.digest() == MpcResult.from_opened(s, {"pattern": [1, 0, 1], "columns": r_cols(r)}).digest()
    key = Ed25519PrivateKey.generate()
    key.public_key().verify(r.sign(key), SIGN_DOMAIN + bytes.fromhex(r.digest()))
    other = dataclasses.replace(r, suppressed=())
    assert other.digest() != r.digest()
    table = r.to_table()
    assert table.column_names == ["segment", "n", "total"] and table.num_rows == 2


def r_cols(r: MpcResult) -> dict:
    return {a: [v[a] for _, v in r.cells] for a in r.aggregates}


def test_session_certificates_carry_the_names_mpyc_checks():
    ca = SessionCA("s1")
    creds = ca.credentials(2)
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=MPyC party 2"
    cert.verify_directly_issued_by(ca.certificate)
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # A player's key can stay with the player: the CA signs its public key only.
    key = generate_player_key()
    issued = x509.load_pem_x509_certificate(ca.issue(0, key.public_key()))
    assert issued.public_key() == key.public_key()
    with pytest.raises(ValueError):
        issued.verify_directly_issued_by(SessionCA("other").certificate)


def test_mpc_error_is_a_job_failure_with_its_own_code():
    e = MpcError("MPC player 1 (bank_b) disconnected", details={"player": 1, "party": "bank_b"})
    assert e.code == "mpc" and e.to_dict()["details"]["player"] == 1


def test_importing_the_adapter_does_not_import_mpyc():
    code = "import sys, mpc.session, mpc.partials, mpc.result; assert 'mpyc' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_explain_says_who_sees_what():
    s = spec(players=(*PLAYERS[:2], Player("coordinator", holds_input=False)))
    doc = s.explain()
    assert doc["kind"] == "mpc" and doc["threshold"] == 1
    assert doc["players"][2] == {"index": 2, "name": "coordinator", "holds_input": False}
    assert doc["trust_assumption"] == s.trust_assumption()
    assert doc["opened"][0].startswith("the pass/suppress pattern")
    assert "COUNT(*) of passing groups, as n" in doc["opened"]


def test_bounds_and_group_size_from_the_owners_policies():
    from sealroom.planning.bounds import measure_from_rules
    from sealroom.planning.checks import strictest_min_group_size as min_group_size
    from sealroom.policy import ColumnRule, DatasetPolicy

    a = ColumnRule("measure", ("sum",), 0.0, 500.0)
    b = ColumnRule("measure", ("sum",), -10.0, 300.0)
    m = measure_from_rules("exposure", [("bank_a.loans", a), ("bank_b.loans", b)], decimals=2, nullable=False)
    assert (m.min, m.max, m.decimals, m.nullable) == (0.0, 300.0, 2, False)  # the strictest range
    with pytest.raises(InvalidQueryError, match="bank_b.loans.exposure has no declared bounds") as e:
        measure_from_rules("exposure", [("bank_a.loans", a), ("bank_b.loans", ColumnRule("measure", ("sum",)))])
    assert e.value.details["rule"] == "bounds"
    with pytest.raises(InvalidQueryError, match="no common range"):
        measure_from_rules(
            "exposure", [("x.y", ColumnRule("measure", ("sum",), 0, 1)), ("z.w", ColumnRule("measure", ("sum",), 2, 3))]
        )
    assert min_group_size([DatasetPolicy(min_group_size=5), DatasetPolicy(min_group_size=11)]) == 11


def test_clear_finishing_of_opened_values_and_nulls():
    """What the players do in the clear with what they opened (mpc.program._finish): scale back,
    divide by a public count, NULL where a passing group has no value of a nullable measure."""
    from mpc.program import clear_columns as _finish

    s = spec(
        aggregates=(
            Aggregate("n", "count", "exposure"),
            Aggregate("s", "sum", "exposure"),
            Aggregate("a", "avg", "exposure"),
            Aggregate("v", "var_samp", "exposure"),
            Aggregate("sd", "stddev_pop", "exposure"),
            Aggregate("lo", "min", "exposure"),
        ),
        measures=(Measure("exposure", 0, 1000, 2, nullable=True),),
    )
    lay = s.layout
    assert lay.count_of("exposure") == "n:exposure" and lay.divided == ()
    # Three passing cells: values 1.50 and 2.50; one value 4.00; no value at all.
    opened = {
        "n:exposure": [2, 1, 0],
        "s:exposure": [400, 400, 0],
        "d:exposure": [2 * (150**2 + 250**2) - 400**2, 0, 0],  # n*q - s^2, in scale^2 units
    }
    cols = _finish(s, 3, opened, {}, {}, {"min:exposure": [150, 400, 100000]})
    assert cols["n"] == [2, 1, 0]
    assert cols["s"] == [4.0, 4.0, None]
    assert cols["a"] == [2.0, 4.0, None]
    assert cols["v"][0] == pytest.approx(0.5) and cols["v"][1:] == [None, None]
    assert cols["sd"][0] == pytest.approx(0.5) and cols["sd"][1] == 0.0 and cols["sd"][2] is None
    assert cols["lo"] == [1.5, 4.0, None]
