"""The console script: --help on every command, and a real (small) benchmark run."""
import json
import subprocess
import sys

import pytest

from linvision.cli import build_parser, main


def subcommands():
    parser = build_parser()
    return list(parser._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", [[]] + [[c] for c in subcommands()])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: linvision" in capsys.readouterr().out


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "linvision", "mixers"], capture_output=True, text=True, check=True).stdout
    assert "softmax" in out and "linear" in out


def test_bench_prints_side_by_side_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--mixers", "linear", "--sizes", "8", "12", "--dim", "32", "--heads", "2",
                 "--repeat", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "speed vs softmax" in out and "memory vs softmax" in out
    rows = json.loads(path.read_text())["mixers"]
    assert {(r["mixer"], r["tokens"]) for r in rows} == {(m, n) for m in ("softmax", "linear") for n in (64, 144)}
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in rows)


def test_bench_train_mode_and_unknown_mixer(capsys):
    assert main(["bench", "--mixers", "linear", "--sizes", "6", "--dim", "16", "--heads", "2", "--repeat", "1",
                 "--mode", "train"]) == 0
    with pytest.raises(SystemExit, match="unknown mixer"):
        main(["bench", "--mixers", "nope", "--sizes", "6"])
