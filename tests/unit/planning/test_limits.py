"""Caps on an analyst's SQL (sealroom/planning/limits.py): refused with the limit's name, the query's
value and how to raise it; the text is measured before anything parses it."""

from __future__ import annotations

import pytest
import sqlglot

from sealroom.cancel import CallScope
from sealroom.config import Table
from sealroom.errors import ConfigError, DeadlineExceededError, ResourceExhaustedError
from sealroom.planning import resolve as resolve_module
from sealroom.planning.limits import DEFAULT_LIMITS, QueryLimits, check_sql_text
from sealroom.planning.sql import analyze, compile_stage, pushdown

SCHEMAS = {"bank_a.loans": ["customer_id", "segment", "amount", "age"]}
LEGIT = "SELECT segment, COUNT(*) AS n, SUM(amount) AS s FROM bank_a.loans WHERE age IN (30, 31) GROUP BY segment"


def in_list(n: int) -> str:
    return f"SELECT COUNT(*) FROM bank_a.loans WHERE customer_id IN ({', '.join(str(10**6 + i) for i in range(n))})"


def deep_sum(terms: int) -> str:
    return "SELECT segment, SUM(amount" + " + amount" * terms + ") AS s FROM bank_a.loans GROUP BY segment"


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the parses of analysts' SQL (a spy on sqlglot.parse as the planning code calls it)."""
    sizes: list[int] = []
    real = sqlglot.parse

    def spy(sql: str, *args: object, **kw: object) -> object:
        sizes.append(len(sql))
        return real(sql, *args, **kw)

    monkeypatch.setattr(resolve_module.sqlglot, "parse", spy)
    return sizes


def test_ten_megabytes_of_sql_are_refused_before_any_parse(parses: list[int]) -> None:
    sql = "SELECT COUNT(*) FROM bank_a.loans WHERE customer_id IN (" + ", ".join(["1"] * 5_000_000) + ")"
    assert len(sql) > 10_000_000
    with pytest.raises(ResourceExhaustedError) as info:
        analyze(sql, SCHEMAS)
    assert parses == []
    err = info.value
    assert err.details == {"limit": "max_sql_bytes", "value": len(sql), "maximum": DEFAULT_LIMITS.max_sql_bytes}
    assert f"{len(sql)} bytes of SQL" in err.message and "[limits]" in err.message
    analyze(LEGIT, SCHEMAS)  # the legitimate query still plans
    assert len(parses) >= 1


def test_a_200_kb_in_list_is_refused_by_its_size_or_its_length(parses: list[int]) -> None:
    sql = in_list(25_000)
    assert 150_000 < len(sql.encode()) < 250_000
    with pytest.raises(ResourceExhaustedError, match="max_sql_bytes"):
        analyze(sql, SCHEMAS)
    assert parses == []
    roomy = QueryLimits(max_sql_bytes=1_000_000, max_expression_nodes=1_000_000)
    with pytest.raises(ResourceExhaustedError) as info:
        analyze(sql, SCHEMAS, limits=roomy)
    assert info.value.details == {"limit": "max_in_list", "value": 25_000, "maximum": roomy.max_in_list}
    assert "an IN list of 25000 items" in info.value.message
    analyze(in_list(roomy.max_in_list), SCHEMAS, limits=roomy)  # at the limit: accepted


def test_a_deep_expression_is_refused_by_the_depth_limit_everywhere_it_is_parsed() -> None:
    sql = deep_sum(950)  # 8.6 KB: within max_sql_bytes
    assert len(sql) < DEFAULT_LIMITS.max_sql_bytes
    specs = {"bank_a.loans": (["customer_id", "segment", "amount", "age"], ["customer_id"])}
    for entry in (lambda: analyze(sql, SCHEMAS), lambda: pushdown(sql, specs)):
        with pytest.raises(ResourceExhaustedError) as info:
            entry()
        assert info.value.details["limit"] == "max_nesting_depth"
        assert "max_nesting_depth = 256" in info.value.message
    analyze(deep_sum(200), SCHEMAS)  # a long but reasonable expression still plans


def test_expression_nodes_are_capped() -> None:
    sql = "SELECT " + ", ".join(f"SUM(amount) * {i} AS s{i}" for i in range(400)) + " FROM bank_a.loans"
    with pytest.raises(ResourceExhaustedError, match="more than 1000 expression nodes"):
        analyze(sql, SCHEMAS, limits=QueryLimits(max_expression_nodes=1000))
    analyze(sql, SCHEMAS)


def test_utf8_bytes_are_counted_not_characters() -> None:
    limits = QueryLimits(max_sql_bytes=100)
    check_sql_text("x" * 100, limits)
    with pytest.raises(ResourceExhaustedError, match="max_sql_bytes"):
        check_sql_text("é" * 51, limits)  # 51 characters, 102 bytes


def test_limits_from_a_config_table() -> None:
    table = Table({"max_sql_bytes": 1000, "max_in_list": 5}, source="c.toml", prefix="limits.")
    assert QueryLimits.from_table(table) == QueryLimits(max_sql_bytes=1000, max_in_list=5)
    with pytest.raises(ConfigError, match="c.toml: unknown key limits.max_rows"):
        QueryLimits.from_table(Table({"max_rows": 1}, source="c.toml", prefix="limits."))
    with pytest.raises(ConfigError, match="limits.max_in_list must be an integer >= 1"):
        QueryLimits.from_table(Table({"max_in_list": 0}, source="c.toml", prefix="limits."))


def test_the_enclave_compilation_applies_the_limits() -> None:
    from sealroom.planning.sql import InputSpec

    spec = InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "amount", "age"), "customer_id")
    with pytest.raises(ResourceExhaustedError, match="max_nesting_depth"):
        compile_stage(deep_sum(950), [spec])


class _Context:
    def __init__(self, *, active: bool = True, remaining: float | None = None):
        self.active, self.remaining = active, remaining

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return self.remaining


def test_call_scope_stops_once_the_call_is_cancelled_or_past_its_deadline() -> None:
    CallScope(_Context()).check("planning")
    CallScope(_Context(remaining=5.0)).check("planning")
    for ctx in (_Context(active=False), _Context(remaining=0.0)):
        with pytest.raises(DeadlineExceededError, match="stopped before planning") as info:
            CallScope(ctx).check("planning")
        assert info.value.details == {"step": "planning"}
