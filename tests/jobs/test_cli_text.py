"""What ``--help``, ``linvision mixers`` and the bench print: plain text, aligned columns, no bar residue in logs."""
import re

import pytest

from linvision.cli import main, mixers_table
from linvision.cli_text import plain_text
from linvision.mixers import list_mixers

from .test_cli import subcommands

REST = re.compile(r"``|:[a-z]+:`|(?<!\w)\*\*\w")  # 2**stages is arithmetic, not markup


def test_plain_text_renders_rest_markup():
    text = "See :func:`~linvision.train.classify.run` and :class:`a.B`, ``x=1`` and **bold**; 2**stages stays."
    assert plain_text(text) == "See run and a.B, x=1 and bold; 2**stages stays."


@pytest.mark.parametrize("command", [[]] + [[c] for c in subcommands()])
def test_help_shows_no_rest_markup(command, capsys):
    with pytest.raises(SystemExit):
        main(command + ["--help"])
    out = capsys.readouterr().out
    assert not REST.search(out), REST.search(out) and out[max(0, REST.search(out).start() - 80):][:160]


def test_classify_help_keeps_the_accelerate_line_break(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    out = capsys.readouterr().out
    assert "-m linvision.train.classify \\\n      --config configs/classify/linvit_small.yaml" in out


def test_mixers_table_aligns_every_option_column():
    lines = mixers_table().splitlines()
    assert [line.split()[0] for line in lines] == list_mixers()
    starts = {len(line) - len(line[len(line.split()[0]):].lstrip()) for line in lines if len(line.split()) > 1}
    assert starts == {max(map(len, list_mixers())) + 2}


def test_bench_draws_no_progress_bar_when_not_a_terminal(capsys):
    assert main(["bench", "--mixers", "linear", "--sizes", "6", "--dim", "16", "--heads", "2", "--repeat", "1"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "bench:" not in captured.err


def test_demo_quick_duration_agrees_between_help_and_readme(capsys):
    import pathlib

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_minutes = re.search(r"about (\d+) minutes, rough digits", capsys.readouterr().out)
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    readme_minutes = re.search(r"`--quick` \(about (\d+) minutes\)", readme)
    assert help_minutes and readme_minutes and help_minutes.group(1) == readme_minutes.group(1)
