"""Real MPC sessions: MPyC player processes over mutual TLS on 127.0.0.1, compared with DuckDB over
the pooled rows; suppression at the k-1/k boundary; no suppressed value in any output or log; a
foreign certificate refused; a crashed, stalled or silent player ends the session with nothing
released, no process left and its ports free, and an error that names it."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pytest

from mpc.partials import local_partials
from mpc.session import PlayerProcess, free_ports, run_session
from mpc.tls import PlayerCredentials, SessionCA
from sealroom.errors import MpcError
from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Measure, Player, StageSpec

pytestmark = pytest.mark.slow

K = 5
SEGMENTS = [f"seg{i}" for i in range(6)]
# Planted in the suppressed group only: it must never show up in any player's output or log.
SECRET_SUM = 918273645


def party_table(rng: np.random.Generator, n: int, *, boundary: dict[str, int]) -> pa.Table:
    """Random rows over seg0..seg3 plus ``boundary`` rows in the boundary groups seg4 (k-1 in all)
    and seg5 (k in all)."""
    seg = [SEGMENTS[i] for i in rng.integers(0, 4, n)]
    x = list(np.round(rng.uniform(0, 1000, n), 2))
    y: list[int | None] = [int(v) for v in rng.integers(-20, 80, n)]
    for key, count in boundary.items():
        seg += [key] * count
        x += [SECRET_SUM / 100 if key == "seg4" else 250.5] * count
        y += [7] * count
    y = [None if i % 13 == 0 else v for i, v in enumerate(y)]
    return pa.table({"seg": seg, "x": pa.array(x, pa.float64()), "y": pa.array(y, pa.int64())})


def pooled(tables: list[pa.Table], sql: str) -> dict[str, tuple]:
    con = duckdb.connect()
    con.register("t", pa.concat_tables(tables))
    return {r[0]: r[1:] for r in con.sql(sql).fetchall()}


def make_spec(players: tuple[Player, ...], aggregates: tuple[Aggregate, ...], **kw) -> StageSpec:
    return StageSpec(
        session_id=kw.pop("session_id", "it"),
        group_by=(GroupColumn("seg"),),
        domain=tuple((s,) for s in [*SEGMENTS, "seg_nobody"]),
        aggregates=aggregates,
        players=players,
        measures=(Measure("x", 0, 10_000_000, 2, nullable=False), Measure("y", -20, 80, 0, nullable=True)),
        min_group_size=K,
        max_rows=100_000,
        **kw,
    )


def no_children_left() -> None:
    deadline = time.monotonic() + 5
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.cmdline() for p in psutil.Process().children(recursive=True)] == []


def ports_are_free(workdir: Path) -> None:
    specs = list(workdir.rglob("spec.json"))
    assert specs
    for host, port in json.loads(specs[0].read_text())["addresses"]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))  # raises if a player still holds it
            s.listen()


def released_text(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workdir.rglob("*") if p.name in ("out.json", "player.log"))


def test_three_players_match_duckdb_and_suppress_at_k_minus_1(tmp_path: Path):
    rng = np.random.default_rng(20261127)
    # seg4: 2 + 1 + 1 = 4 = k-1 rows in all (suppressed); seg5: 2 + 2 + 1 = 5 = k (released).
    tables = [
        party_table(rng, 120, boundary={"seg4": 2, "seg5": 2}),
        party_table(rng, 90, boundary={"seg4": 1, "seg5": 2}),
        party_table(rng, 60, boundary={"seg4": 1, "seg5": 1}),
    ]
    aggs = (
        Aggregate("n", "count"),
        Aggregate("total", "sum", "x"),
        Aggregate("mean", "avg", "x"),
        Aggregate("var", "var_samp", "x"),
        Aggregate("sd", "stddev_pop", "x"),
        Aggregate("ny", "count", "y"),
        Aggregate("lo", "min", "y"),
        Aggregate("hi", "max", "x"),
    )
    players = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(players, aggs)
    partials = {i: local_partials(t, spec, party=p.name) for i, (t, p) in enumerate(zip(tables, players))}
    result = run_session(spec, partials, timeout=60, workdir=tmp_path)

    ref = pooled(
        tables,
        "SELECT seg, count(*), sum(x), avg(x), var_samp(x), stddev_pop(x), count(y), min(y), max(x) "
        "FROM t GROUP BY seg",
    )
    cells = result.as_dict()
    assert sorted(k[0] for k in cells) == ["seg0", "seg1", "seg2", "seg3", "seg5"]
    assert result.suppressed == (("seg4",), ("seg_nobody",))
    for (seg,), got in cells.items():
        n, total, mean, var, sd, ny, lo, hi = ref[seg]
        assert got["n"] == n and got["ny"] == ny and got["lo"] == lo  # exact
        assert got["total"] == pytest.approx(total, rel=1e-12) and got["hi"] == pytest.approx(hi)
        assert got["mean"] == pytest.approx(mean, rel=1e-9)
        assert got["var"] == pytest.approx(var, rel=1e-9) and got["sd"] == pytest.approx(sd, rel=1e-9)
    assert result.rule["min_group_size"] == K
    assert "no 2 of the 3 players collude" in result.trust_assumption
    assert result.stats["mpc_seconds"] > 0
    # The suppressed group's value (and the players' own partial sums) are in no output or log.
    text = released_text(tmp_path)
    assert str(SECRET_SUM) not in text and "9182736" not in text
    for p in partials.values():
        assert str(p.values["s:x"][4]) not in text
    outs = [json.loads(p.read_text()) for p in tmp_path.rglob("out.json")]
    assert len(outs) == 3 and all(o["result"]["pattern"][4] == 0 for o in outs)
    # ...nor in any file a player had: its input came by pipe (its spec file is public).
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith((".key", ".crt"))]
    assert files and all("input" not in json.loads(p.read_text()) for p in files if p.name == "spec.json")
    every = "\n".join(p.read_text(errors="replace") for p in files)
    for p in partials.values():
        assert json.dumps(p.values["s:x"]) not in every and json.dumps(p.cap) not in every
    no_children_left()
    ports_are_free(tmp_path)


def test_four_players_with_a_helper_divide_inside_the_mpc(tmp_path: Path):
    rng = np.random.default_rng(7)
    tables = [
        party_table(rng, 80, boundary={"seg4": 4, "seg5": 1}),
        party_table(rng, 50, boundary={"seg4": 0, "seg5": 3}),
        party_table(rng, 40, boundary={"seg4": 1, "seg5": 0}),
    ]
    # No count opened: AVG and VAR of the nullable y are divided inside the MPC (fixed point).
    aggs = (Aggregate("mean_y", "avg", "y"), Aggregate("var_y", "var_pop", "y"), Aggregate("sum_y", "sum", "y"))
    players = (Player("h1"), Player("h2"), Player("h3"), Player("coordinator", holds_input=False))
    spec = make_spec(players, aggs, session_id="it4")
    assert spec.layout.divided == ("y",)
    partials = {i: local_partials(t, spec, party=players[i].name) for i, t in enumerate(tables)}
    result = run_session(spec, partials, timeout=90, workdir=tmp_path)
    ref = pooled(tables, "SELECT seg, avg(y), var_pop(y), sum(y), count(*) FROM t GROUP BY seg")
    cells = result.as_dict()
    assert set(cells) == {(s,) for s, r in ref.items() if r[3] >= K}
    assert ("seg4",) in cells and ("seg5",) not in cells  # 5 rows released, 4 suppressed
    for (seg,), got in cells.items():
        mean, var, total, _ = ref[seg]
        assert got["sum_y"] == total
        assert got["mean_y"] == pytest.approx(mean, rel=1e-9)
        assert got["var_y"] == pytest.approx(var, rel=1e-9)
    assert "helper players holding no input: coordinator" in result.trust_assumption
    assert [p["holds_input"] for p in result.players] == [True, True, True, False]
    no_children_left()


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path):
    players = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(players, (Aggregate("n", "count"),), session_id="tls")
    rng = np.random.default_rng(1)
    partials = {i: local_partials(party_table(rng, 30, boundary={}), spec, party=p.name) for i, p in enumerate(players)}
    rogue = SessionCA("somebody else's").credentials(1)  # right CN, wrong CA
    t0 = time.monotonic()
    with pytest.raises(MpcError) as e:
        run_session(spec, partials, timeout=30, start_timeout=3, workdir=tmp_path, credentials={1: rogue})
    assert time.monotonic() - t0 < 15
    assert e.value.details["player"] == 1 and e.value.details["party"] == "bank_b"
    assert e.value.details["reason"] == "tls_refused"
    assert not [o for o in tmp_path.rglob("out.json") if json.loads(o.read_text())["status"] == "ok"]
    no_children_left()
    ports_are_free(tmp_path)


def _run_in_background(spec, partials, **kw):
    box: dict = {}

    def target():
        try:
            box["result"] = run_session(spec, partials, **kw)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def _player(index: int, timeout: float = 30) -> psutil.Process:
    """Player ``index`` of the running session, once it is connected to both peers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            try:
                if f"player-{index}" in " ".join(p.cmdline()):
                    established = [c for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED]
                    if len(established) >= 2:
                        return p
            except psutil.Error:
                continue
        time.sleep(0.01)
    raise AssertionError(f"player {index} never connected")


def _slow_spec(name: str, groups: int = 20_000) -> tuple[StageSpec, dict]:
    """A session that runs for a second or two once connected, in many short steps (so that
    players notice a dropped peer promptly): counts and sums over a large domain."""
    players = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    domain = tuple((f"g{i}",) for i in range(groups))
    spec = StageSpec(
        session_id=name,
        group_by=(GroupColumn("g"),),
        domain=domain,
        aggregates=(Aggregate("n", "count"), Aggregate("s", "sum", "x")),
        players=players,
        measures=(Measure("x", 0, 100, 0, nullable=False),),
        min_group_size=2,
    )
    rng = np.random.default_rng(5)
    partials = {}
    for i, p in enumerate(players):
        t = pa.table(
            {"g": [f"g{j}" for j in rng.integers(0, groups, 3 * groups)], "x": rng.integers(0, 100, 3 * groups)}
        )
        partials[i] = local_partials(t, spec, party=p.name)
    return spec, partials


@pytest.mark.parametrize("how", ["crash", "stall", "silent"])
def test_a_failing_player_ends_the_session_and_is_named(tmp_path: Path, how: str):
    spec, partials = _slow_spec(how)
    kw = {"timeout": 60, "stall_timeout": 2.0, "workdir": tmp_path}
    if how == "silent":  # stopped but within stall_timeout: the session timeout ends it
        kw.update(timeout=4.0, stall_timeout=60.0)
    t0 = time.monotonic()
    th, box = _run_in_background(spec, partials, **kw)
    victim = _player(1)
    if how == "crash":
        victim.send_signal(signal.SIGKILL)
    else:
        victim.send_signal(signal.SIGSTOP)
    th.join(30)
    assert not th.is_alive()
    elapsed = time.monotonic() - t0
    assert "result" not in box, "a session with a failed player released something"
    err = box["error"]
    assert isinstance(err, MpcError), repr(err)
    assert err.details["player"] == 1 and err.details["party"] == "bank_b"
    assert "MPC player 1 (bank_b)" in err.message
    assert err.details["reason"] == {"crash": "crashed", "stall": "stalled", "silent": "timeout"}[how]
    assert elapsed < (20 if how != "silent" else 24)  # well under the 60 s session timeout; slack for a busy host
    if how == "crash":  # the surviving players that reported in time saw the disconnect of player 1
        # (a player busy in a long step may see the other survivor gone too by the time it looks)
        reports = [json.loads(p.read_text()) for p in tmp_path.rglob("out.json")]
        assert reports and all(r["reason"] == "peer_disconnected" and 1 in r["peers"] for r in reports)
    assert not any(json.loads(p.read_text()).get("status") == "ok" for p in tmp_path.rglob("out.json"))
    no_children_left()
    ports_are_free(tmp_path)
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


def test_a_player_that_never_starts_is_named(tmp_path: Path):
    spec, partials = _slow_spec("never", groups=50)
    th, box = _run_in_background(spec, partials, timeout=30, start_timeout=3, workdir=tmp_path, stall_timeout=60)
    deadline = time.monotonic() + 20
    victim = None
    while victim is None and time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            try:
                if "player-2" in " ".join(p.cmdline()):
                    victim = p
            except psutil.Error:
                continue
    assert victim is not None
    victim.send_signal(signal.SIGSTOP)  # before it ever listens or connects
    # Meanwhile player 1 listens (for player 0) -- on 127.0.0.1 only, although MPyC binds all interfaces.
    listening: list = []
    deadline = time.monotonic() + 10
    while not listening and time.monotonic() < deadline:
        for p in psutil.Process().children(recursive=True):
            try:
                if "player-1" in " ".join(p.cmdline()):
                    listening = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        time.sleep(0.02)
    assert listening and set(listening) == {"127.0.0.1"}
    th.join(30)
    err = box.get("error")
    assert isinstance(err, MpcError) and err.details["player"] == 2, repr(err)
    assert err.details["reason"] in ("start_timeout", "stalled")
    no_children_left()
    ports_are_free(tmp_path)


def test_each_party_runs_its_own_player(tmp_path: Path):
    """The party-agent view: three PlayerProcess objects, as three agents would start them, each
    with its own key (only the public key goes to the session CA) and its own input."""
    from mpc.result import MpcResult
    from mpc.session import PlayerProcess, free_ports
    from mpc.tls import PlayerCredentials, generate_player_key, key_pem

    spec, partials = _slow_spec("agents", groups=3)
    spec = StageSpec.from_dict({**spec.to_dict(), "aggregates": [{"name": "n", "func": "count", "column": None}]})
    partials = {
        i: local_partials(pa.table({"g": ["g1"] * (i + 1), "x": [1] * (i + 1)}), spec, party="p") for i in range(3)
    }
    ca = SessionCA(spec.session_id)
    addresses = [("127.0.0.1", p) for p in free_ports(3)]

    def player(i: int) -> PlayerProcess:
        key = generate_player_key()  # stays with the party
        creds = PlayerCredentials(i, ca.ca_pem, ca.issue(i, key.public_key()), key_pem(key))
        return PlayerProcess(
            spec, i, addresses=addresses, credentials=creds, partials=partials[i], directory=tmp_path / f"agent-{i}"
        )

    players = [player(i) for i in range(3)]
    try:
        for p in players:
            p.start()
        docs = [p.wait(30) for p in players]
    finally:
        for p in players:
            p.close()
    results = [MpcResult.from_opened(spec, d["result"]) for d in docs]
    assert len({r.digest() for r in results}) == 1
    assert results[0].as_dict() == {("g1",): {"n": 6}}  # 1 + 2 + 3 rows; min_group_size is 2
    no_children_left()

    # A peer dies mid-session: the agent's own player reports it, naming the peer.
    spec, partials = _slow_spec("agents-crash")
    addresses = [("127.0.0.1", p) for p in free_ports(3)]
    ca = SessionCA(spec.session_id)
    players = [
        PlayerProcess(
            spec,
            i,
            addresses=addresses,
            credentials=ca.credentials(i),
            partials=partials[i],
            directory=tmp_path / "crash" / f"player-{i}",
        )
        for i in range(3)
    ]
    try:
        for p in players:
            p.start()
        victim = _player(2)
        victim.send_signal(signal.SIGKILL)
        with pytest.raises(MpcError) as e:
            players[0].wait(30)
        assert e.value.details["player"] == 2 and e.value.details["reason"] == "peer_disconnected"
    finally:
        for p in players:
            p.close()
    no_children_left()


def test_a_port_taken_before_a_player_listens_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """free_ports() cannot reserve a port: if another process takes one before the player listens,
    the player reports it and the session starts again on fresh ports (nothing was shared yet)."""
    from mpc import session

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    calls: list[list[int]] = []
    real = session.free_ports

    def racy(n: int, host: str = "127.0.0.1") -> list[int]:
        ports = real(n, host)
        if not calls:
            ports[1] = taken.getsockname()[1]  # player 1 listens; this port is already in use
        calls.append(ports)
        return ports

    monkeypatch.setattr(session, "free_ports", racy)
    spec, partials = _slow_spec("race", groups=30)
    try:
        result = session.run_session(spec, partials, timeout=60, workdir=tmp_path)
    finally:
        taken.close()
    assert len(calls) == 2 and calls[1][1] != calls[0][1]
    assert len(result.cells) + len(result.suppressed) == 30
    no_children_left()


def test_a_player_claiming_another_index_is_refused_by_the_listening_side(tmp_path: Path):
    """MPyC checks a peer's name only where it connects; the listener takes the index the peer
    announces. Player 0 (which only connects) presents the session CA's certificate for player 1:
    the listeners (players 1 and 2) must refuse it, or player 0 could pose as player 1."""
    players = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(players, (Aggregate("n", "count"),), session_id="impostor")
    rng = np.random.default_rng(2)
    partials = {i: local_partials(party_table(rng, 30, boundary={}), spec, party=p.name) for i, p in enumerate(players)}
    ca = SessionCA(spec.session_id)
    as_one = ca.credentials(1)
    impostor = PlayerCredentials(0, as_one.ca_pem, as_one.cert_pem, as_one.key_pem)  # index 0, CN "MPyC party 1"
    with pytest.raises(MpcError) as e:
        run_session(spec, partials, timeout=30, start_timeout=3, workdir=tmp_path, credentials={0: impostor}, ca=ca)
    assert e.value.details["player"] == 0 and e.value.details["reason"] == "tls_refused"
    assert not [o for o in tmp_path.rglob("out.json") if json.loads(o.read_text())["status"] == "ok"]
    no_children_left()
    ports_are_free(tmp_path)


def test_a_player_killed_before_it_starts_never_starts(tmp_path: Path):
    """An abort that lands before the process exists: start() refuses, nothing runs."""
    players = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(players, (Aggregate("n", "count"),), session_id="killed")
    ca = SessionCA(spec.session_id)
    rng = np.random.default_rng(3)
    p = PlayerProcess(
        spec,
        0,
        addresses=[("127.0.0.1", port) for port in free_ports(3)],
        credentials=ca.credentials(0),
        partials=local_partials(party_table(rng, 10, boundary={}), spec, party="bank_a"),
        directory=tmp_path / "p0",
    )
    p.kill()
    with pytest.raises(MpcError, match="stopped before it started"):
        p.start()
    assert p.proc is None
    no_children_left()
