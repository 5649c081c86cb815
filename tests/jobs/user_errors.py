"""The jobs' user-error contract, checked the same way by every job test: exit code 2, exactly one stderr line
(``linvision <job>: error: ...``), and nothing written to the output folder."""
import argparse
import importlib
from pathlib import Path
from typing import Optional, Sequence

from linvision.cli import JOBS
from linvision.cli import main as cli_main


def user_error(capsys, argv: Sequence[str], out: Optional[Path] = None, parse: bool = True) -> str:
    """Run ``linvision argv`` in-process; assert the contract and return the message (after ``error: ``).

    ``parse=False`` calls the job's ``main`` with ``argv[1:]`` as overrides, without building the whole
    command-line parser (what the table of bad values does, hundreds of times)."""
    capsys.readouterr()
    if parse:
        code = cli_main(list(argv))
    else:
        job = importlib.import_module(JOBS[argv[0]][0])
        code = job.main(argparse.Namespace(config=None, resume=None, overrides=list(argv[1:])))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr {err}"
    assert len(err) == 1, err
    prefix = f"linvision {argv[0]}: error: "
    assert err[0].startswith(prefix), err[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return err[0][len(prefix):]
