"""The ppfast command: simulate (text, JSON, PNG, trace), validate and export."""

import json
import subprocess
import sys

import pytest

from ppfast.program.torch_format import read_csv
from ppfast.tools.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_json_has_the_fields_benchmarks_rely_on(capsys):
    code, out, _ = run(capsys, "simulate", "--schedule", "1f1b", "-p", "4", "-m", "8", "--json")
    assert code == 0
    obj = json.loads(out)
    for key in (
        "schedule",
        "p",
        "m",
        "makespan",
        "bubble",
        "bubble_per_rank",
        "peak_activations",
        "valid",
    ):
        assert key in obj
    assert obj["valid"] is True and obj["schedule"] == "1f1b"
    assert obj["makespan"] == 33 and obj["bubble"] == pytest.approx(3 / 11)
    assert obj["peak_activations"] == [4, 3, 2, 1]


def test_simulate_costs_mem_cap_and_chunks(capsys):
    code, out, _ = run(
        capsys,
        "simulate",
        "-s",
        "interleaved-1f1b",
        "-p",
        "2",
        "-m",
        "4",
        "-v",
        "2",
        "--costs",
        "1,2,1,0.1",
        "--mem-cap",
        "3",
        "--json",
    )
    obj = json.loads(out)
    assert code == 0 and obj["v"] == 2 and obj["costs"] == {"F": 1, "I": 2, "W": 1, "comm": 0.1}
    assert obj["within_mem_cap"] is True


def test_simulate_draws_png_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "zbv.png", tmp_path / "zbv.json"
    code, out, _ = run(
        capsys,
        "simulate",
        "-s",
        "zb-v",
        "-p",
        "4",
        "-m",
        "8",
        "--png",
        str(png),
        "--trace",
        str(trace),
    )
    assert code == 0 and "bubble" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 4 * 2 * 8 * 3  # p * v * m * (F, I, W)
    assert {e["tid"] for e in spans} == {0, 1, 2, 3}
    assert {e["cat"] for e in spans} == {"F", "I", "W"}


def test_export_then_validate_round_trip(tmp_path, capsys):
    path = tmp_path / "zbh1.csv"
    code, _, _ = run(capsys, "export", "-s", "zb-h1", "-p", "3", "-m", "6", "-o", str(path))
    assert code == 0
    prog = read_csv(path)
    assert prog.name == "zbh1.csv" and prog.num_microbatches == 6
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0 and "valid (compute-only" in out
    comm = tmp_path / "zbh1_comm.csv"
    code, _, _ = run(
        capsys,
        "export",
        "-s",
        "zb-h1",
        "-p",
        "3",
        "-m",
        "6",
        "--with-comms",
        "--naming",
        "legacy",
        "-o",
        str(comm),
    )
    assert code == 0 and "SEND_F" in comm.read_text() and ",0B0" in comm.read_text()
    code, out, _ = run(capsys, "validate", str(comm))
    assert code == 0 and "with communication, legacy naming" in out


def test_validate_rejects_a_bad_file_with_its_diagnosis(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    code, _, err = run(capsys, "validate", str(bad))
    assert code == 1
    assert "rank 0, action 0B0 (#1)" in err
    assert "waits forever" in err


def test_simulate_an_imported_torch_csv(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W0,1W1\n")
    code, out, _ = run(capsys, "simulate", "--import-torch-csv", str(path), "--json")
    obj = json.loads(out)
    assert code == 0 and obj["valid"] and obj["p"] == 2 and obj["m"] == 2


def test_bad_arguments_say_what_to_change(capsys):
    code, _, err = run(capsys, "simulate", "-s", "nosuch", "-p", "2", "-m", "2")
    assert code == 2 and "known schedules" in err
    code, _, err = run(capsys, "simulate", "-s", "dualpipev", "-p", "4", "-m", "3")
    assert code == 2 and "dualpipev" in err
    code, _, err = run(capsys, "simulate", "-p", "2")
    assert code == 2 and "--schedule" in err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "ppfast", "list"], capture_output=True, text=True, check=True
    )
    assert "zb-v" in out.stdout and "dualpipev" in out.stdout
