"""The `boxlite` click group: every command, gathered from the module for its concern.

boxes.py (ls, inspect, rm, start, stop, pause, resume, logs, port, metrics), run.py (run, create,
exec), files.py (cp), images.py (images …, pull), guest.py (guest build), host.py (backends,
doctor), snapshots.py (snapshot save/ls/rm, fork), templates.py (templates ls/rm/prune).
Each module lists what it adds in ``COMMANDS``; main.py runs the group.
"""

from __future__ import annotations

import click

from . import boxes, files, guest, host, images, run, snapshots, templates


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="boxlite-core", prog_name="boxlite")
def cli() -> None:
    """boxlite: run untrusted code in micro-VMs."""


for _module in (boxes, run, files, images, guest, host, snapshots, templates):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
