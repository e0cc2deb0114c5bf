"""``--epsilon E`` on submit, explain and local, and ``epsilon=`` in the Python client: unusable
values are refused before anything is sent (the CLI exits 2), a usable one reaches the request."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cli import main, parser_for
from sealroom.app.client import Client, check_epsilon
from sealroom.errors import InvalidQueryError

SQL = "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment"
BAD = ["0", "-1", "nan", "inf", "abc", "", "0.5x"]


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return int(done.value.code or 0)


@pytest.mark.parametrize("command", ["explain", "submit"])
@pytest.mark.parametrize("value", BAD)
def test_unusable_epsilon_exits_2_before_calling_anyone(command, value, capsys):
    # The coordinator address is unreachable: exit 2 proves the value was refused first.
    assert _exit([command, "--coordinator", "127.0.0.1:1", "--plaintext", "--epsilon", value, SQL]) == 2
    err = capsys.readouterr().err
    assert "--epsilon" in err and "greater than 0" in err


@pytest.mark.parametrize("command", ["explain", "submit", "local"])
def test_a_usable_epsilon_is_parsed_and_left_out_is_none(command):
    argv = [command, "--epsilon", "0.25", SQL]
    assert parser_for(argv).parse_args(argv).epsilon == 0.25
    assert parser_for([command, SQL]).parse_args([command, SQL]).epsilon is None


def test_local_refuses_an_unusable_epsilon_and_one_without_dp_datasets(tmp_path, capsys):
    pq.write_table(pa.table({"customer_id": [1, 2], "segment": ["a", "b"]}), tmp_path / "a.parquet")
    dataset = f"bank_a.loans={tmp_path / 'a.parquet'}"
    assert _exit(["local", "--dataset", dataset, "--epsilon", "-0.5", SQL]) == 2
    assert "greater than 0" in capsys.readouterr().err
    # Threshold datasets only (the default policy): an epsilon would buy nothing.
    assert (
        _exit(["local", "--dataset", dataset, "--privacy-unit", "bank_a.loans=customer_id", "--epsilon", "0.5", SQL])
        == 2
    )
    err = capsys.readouterr().err
    assert "no dataset here is" in err and "leave --epsilon out" in err


@pytest.mark.parametrize("value", [0, -0.1, math.nan, math.inf, -math.inf])
def test_the_client_refuses_unusable_values_as_invalid_queries(value):
    with pytest.raises(InvalidQueryError, match="greater than 0") as err:
        check_epsilon(value)
    assert isinstance(err.value, ValueError) and err.value.details["rule"] == "epsilon"
    with pytest.raises(InvalidQueryError):
        Client("127.0.0.1:1", plaintext=True, epsilon=value)


@pytest.mark.parametrize("value", ["0.5", True, [0.5]])
def test_the_client_refuses_what_is_not_a_number_as_a_type_error(value):
    with pytest.raises(TypeError, match="epsilon must be a number"):
        check_epsilon(value)


def test_a_call_s_epsilon_wins_over_the_client_default_and_none_sends_zero():
    with Client("127.0.0.1:1", plaintext=True, epsilon=0.3) as c:
        assert c._request(SQL, None).epsilon == 0.3
        assert c._request(SQL, 0.1).epsilon == 0.1
        with pytest.raises(InvalidQueryError):
            c._request(SQL, -1)
    with Client("127.0.0.1:1", plaintext=True) as c:
        assert c.epsilon is None and c._request(SQL, None).epsilon == 0.0  # 0: the platform's default
        assert c._request(SQL, 2).epsilon == 2.0
