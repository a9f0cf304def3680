"""The ``gpipe-bench`` command line: thin; parse, load, call, print."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpipe-bench")
def main() -> None:
    """Reproduce the published GPipe/torchgpipe tables on this machine.

    The engine is importable as ``gpipe_bench.pipe`` (torchgpipe 0.0.7's API).
    The engine's CPU benchmark: ``make bench-engine``.
    """
