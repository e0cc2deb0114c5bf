"""Progress and output on a terminal: per-party progress bars (drawn only on a TTY), aligned tables,
the structured progress a query's status carries, and ``--json`` on every command that prints."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from sealroom.app.cells import format_table
from sealroom.app.cli import build_parser, main
from sealroom.app.client import parse_progress
from sealroom.app.render import ProgressDisplay, human_bytes, progress_lines


def status(**parties):
    return {
        "query_id": "q_1",
        "status": "running",
        "progress": f"streaming {sum(1 for p in parties.values() if p['done'])}/{len(parties)} parties",
        "parties": parties,
    }


def entry(bytes=0, frames=0, rows=None, rows_total=None, done=False):
    return {"bytes": bytes, "frames": frames, "rows": rows, "rows_total": rows_total, "done": done}


def test_progress_lines_show_a_bar_per_party_with_rows_where_shared_and_bytes():
    lines = progress_lines(
        status(
            bank_a=entry(bytes=2_500_000, frames=2, rows=12_000, rows_total=24_000),
            bank_b=entry(bytes=1_200, frames=1),
            bank_c=entry(bytes=9_000_000, frames=5, rows=30_000, rows_total=30_000, done=True),
        ),
        width=10,
    )
    assert lines[0] == "q_1: running - streaming 1/3 parties"
    a, b, c = lines[1:]
    assert a.startswith("  bank_a [#####-----]  50%") and "12,000/24,000 rows" in a and "2.5 MB in 2 frames" in a
    assert a.endswith("sending")
    # bank_b does not share its row count: no rows, no percentage, a block that moves per frame.
    assert "rows" not in b and "%" not in b and "===" in b and "1.2 kB in 1 frames" in b
    assert c.startswith("  bank_c [##########] 100%") and c.endswith("sent")


def test_progress_lines_without_streams_is_one_line():
    assert progress_lines({"query_id": "q_2", "status": "released", "progress": "released", "parties": {}}) == [
        "q_2: released"
    ]


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 2_500_000, 3.2e9, 5e12)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "2.5 MB",
        "3.2 GB",
        "5,000.0 GB",
    ]


def test_display_redraws_in_place_on_a_tty():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True, width=10)
    display(status(bank_a=entry(bytes=100, frames=1, rows=10, rows_total=40)))
    display(status(bank_a=entry(bytes=400, frames=4, rows=40, rows_total=40, done=True)))
    text = out.getvalue()
    first, second = text.split("\x1b[2F")  # the second drawing goes back up over the two lines of the first
    assert "[##--------]  25%" in first and "[##########] 100%" in second and "sent" in second
    assert first.count("\n") == 2 and all(line.endswith("\x1b[K") for line in first.splitlines())


def test_display_off_a_tty_writes_one_line_per_step_not_per_byte():
    out = io.StringIO()
    display = ProgressDisplay(out, prefix="[sealroom] ")
    assert display.tty is False
    for n in (1, 2, 3):
        display(status(bank_a=entry(bytes=n * 100, frames=n)))
    display(status(bank_a=entry(bytes=400, frames=4, done=True)))
    display({"query_id": "q_1", "status": "released", "progress": "released", "parties": {}})
    assert out.getvalue().splitlines() == [
        "[sealroom] q_1: running streaming 0/1 parties",
        "[sealroom] q_1: running streaming 1/1 parties",
        "[sealroom] q_1: released released",
    ]
    assert "\x1b" not in out.getvalue()


def test_parse_progress_reads_structured_and_plain_progress():
    doc = {"text": "streaming 0/1 parties", "parties": {"bank_a": entry(bytes=5)}}
    assert parse_progress(json.dumps(doc)) == ("streaming 0/1 parties", {"bank_a": entry(bytes=5)})
    assert parse_progress("approvals 1/2; awaiting bank_b") == ("approvals 1/2; awaiting bank_b", {})
    assert parse_progress("{not json") == ("{not json", {})
    assert parse_progress("") == ("", {})


def test_format_table_aligns_numbers_right_and_text_left():
    table = format_table(["segment", "n", "total"], [["retail", 1200, 1.5], ["sme", 8, None]])
    assert table.splitlines() == [
        "segment      n   total",
        "-------  -----  ------",
        "retail   1,200  1.5000",
        "sme          8       ·",
    ]


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


def test_every_command_that_prints_has_json():
    leaves = dict(_leaves(build_parser()))
    assert ("dev", "init") in leaves and ("submit",) in leaves
    # The three servers print nothing on stdout: they log to stderr until stopped.
    servers = {("coordinator", "serve"), ("enclave", "serve"), ("party", "serve")}
    missing = [
        " ".join(path)
        for path, parser in leaves.items()
        if path not in servers and not any("--json" in a.option_strings for a in parser._actions)
    ]
    assert missing == []


def test_dev_init_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["dev", "init", "--dir", str(tmp_path / "dev"), "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["simulated"] is True
    assert doc["dev_root"].endswith(".crt") and (tmp_path / "dev").is_dir()
    assert str(tmp_path / "dev") in doc["key"]


def test_text_from_the_coordinator_cannot_drive_the_terminal() -> None:
    """States, names and progress text come from the coordinator: escape sequences in them are drawn
    harmless, and malformed party entries are skipped, not a crash."""
    from sealroom.app.render import progress_lines

    status = {
        "query_id": "q1\x1b[2J",
        "status": "running\x07",
        "progress": "streaming\x1b]0;owned\x07",
        "parties": {"bank_a\x1b[31m": {"bytes": 10, "frames": 1, "rows": None, "rows_total": None}, "bad": "x"},
    }
    text = "\n".join(progress_lines(status))
    assert "\x1b" not in text and "\x07" not in text
    assert "bank_a?[31m" in text and "bad" not in text


def test_a_filtered_stream_reports_nothing_until_it_has_ended() -> None:
    """A filtered stream is padded so that its size hides how many rows passed the filter; counts
    taken while it streams would tell real frames from padding: it reports only when done."""
    import pyarrow as pa

    from connectors.agent import StreamCounter

    counter = StreamCounter("loans", rows_shared=True, padded=True)
    list(counter.count_frames(iter([b"x" * 100, b"y" * 50])))
    list(counter.count_rows(iter([pa.record_batch({"a": [1, 2, 3]})])))
    live = counter.to_proto()
    assert (live.bytes, live.frames, live.rows, live.done) == (0, 0, 0, False)
    counter.done = True
    final = counter.to_proto()
    assert (final.bytes, final.frames, final.rows, final.done) == (150, 2, 3, True)
    unfiltered = StreamCounter("loans", rows_shared=False)
    list(unfiltered.count_frames(iter([b"z" * 10])))
    assert unfiltered.to_proto().bytes == 10  # an unfiltered stream shows its size anyway
