"""The command line the config-driven jobs share (``linvision classify | distill | linearize | sample``, the demo).

``--config YAML``, ``--resume [CHECKPOINT]`` (the override ``train.resume=...``) and ``section.key=value``
overrides; the config's keys in the epilog; the result as one JSON line from the main process; and
``python -m linvision.train.<job>`` (what ``accelerate launch -m`` runs on every process).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from linvision.cli_text import PlainHelpFormatter
from linvision.errors import reports_user_errors

from .config import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, config_example: str, overrides_example: str,
                         keys: str, resume: bool = True) -> None:
    """``--config``, ``--resume`` (jobs that checkpoint: ``resume``) and the overrides, with ``keys`` (the job's
    ``describe()``) in the epilog."""
    parser.add_argument("--config", default=None, metavar="YAML", help=f"config file, e.g. {config_example}")
    if resume:
        parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                            help="continue from output_dir/checkpoint.pt (or the given checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"config overrides, YAML values ({overrides_example})")
    parser.epilog = (parser.epilog or "") + "\n" + keys


def run_config_job(args: argparse.Namespace, configs: str, load: Callable[[Optional[str], List[str]], Any],
                   run: Callable[[Any], Dict[str, Any]]) -> int:
    """Load the config from ``args`` (``configs``: the folder of examples named in the error), run it, print
    its result as JSON on the main process; exit code 0."""
    from accelerate import PartialState

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    if args.config is None and not overrides:
        raise ConfigError(f"give --config YAML (see {configs}) and/or overrides")
    result = run(load(args.config, overrides))
    if result and PartialState().is_main_process:
        print(json.dumps(result))
    return 0


def say(accelerator, message: str, job: str) -> None:
    """``[job] message`` on the main process only, through ``tqdm.write`` (progress bars stay intact)."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"[{job}] {message}")


def module_cli(prog: str, description: Optional[str], add_arguments: Callable[[argparse.ArgumentParser], None],
               main: Callable[[argparse.Namespace], int], argv: Optional[List[str]] = None,
               formatter_class=PlainHelpFormatter) -> int:
    """A job's own entry point (``python -m ...``): its parser, then ``main``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter_class)
    add_arguments(parser)
    return main(parser.parse_args(argv))


@dataclass(frozen=True)
class ConfigJob:
    """One config-driven job's command line (``linvision <name>`` and ``python -m linvision.train.<name>``):
    its module exposes ``add_arguments, main, cli = JOB.add_arguments, JOB.main, JOB.cli``.

    ``config_example``: a config file of the job, in the folder of its examples; ``overrides_example``: a few
    ``section.key=value`` for the help; ``describe()``: the config keys for the epilog; ``load(path,
    overrides)``: the checked config; ``run(config)``: the result dict printed as JSON.
    """

    name: str
    doc: Optional[str]
    config_example: str
    overrides_example: str
    describe: Callable[[], str]
    load: Callable[[Optional[str], List[str]], Any]
    run: Callable[[Any], Dict[str, Any]]
    formatter_class: type = PlainHelpFormatter

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The job's options: ``--config``, ``--resume`` and the overrides (see :func:`add_config_arguments`)."""
        add_config_arguments(parser, self.config_example, self.overrides_example, self.describe())

    def main(self, args: argparse.Namespace) -> int:
        """Run the job from parsed arguments; a user error (config, data, checkpoint, ...) is one line, exit 2."""
        return reports_user_errors(f"linvision {self.name}")(self._run)(args)

    def cli(self, argv: Optional[List[str]] = None) -> int:
        """The module's own entry point (what ``accelerate launch -m`` runs on every process)."""
        return module_cli(f"linvision {self.name}", self.doc, self.add_arguments, self.main, argv,
                          formatter_class=self.formatter_class)

    def _run(self, args: argparse.Namespace) -> int:
        folder = self.config_example.rsplit("/", 1)[0] + "/"
        return run_config_job(args, folder, self.load, self.run)


__all__ = ["ConfigJob", "add_config_arguments", "module_cli", "run_config_job", "say"]
