"""``python -m linvision.demo``: the demo job."""
from . import cli

raise SystemExit(cli())
