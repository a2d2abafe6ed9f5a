"""The ``webcurate`` command line: one subcommand per stage.

Each area registers its commands from its own ``cli`` module (listed in
``COMMAND_MODULES``), which imports only click at module level so that
``webcurate --help`` stays fast; heavy libraries load inside the commands.
"""
from __future__ import annotations

import importlib
import os
import sys

# faiss/OpenMP threads spin while idle by default, which starves Ray workers
# and data loading on small machines; must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

COMMAND_MODULES = [
    "webcurate.shards.cli",
    "webcurate.curation.cli",
    "webcurate.curation.quality_cli",
    "webcurate.curation.labeling.cli",
    "webcurate.train.cli",
    "webcurate.pipeline.jobs_cli",
    "webcurate.pipeline.run_cli",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="webcurate")
def main() -> None:
    """webcurate: raw web images -> curated WebDataset shards -> DINOv2/iBOT
    backbones -> pseudo-labelled datasets, on Ray (local by default, a cluster
    through RAY_ADDRESS), with local folders or s3:// underneath.

    \b
    Flow:  shard -> embed -> dedup -> retrieve -> cluster -> sample -> export
           -> train -> eval -> label          (or all at once: webcurate run)
    """


def _register() -> None:
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()


def run() -> None:
    """Entry point that turns known user errors into one clear line and exit 2."""
    from webcurate.shards.errors import USER_ERRORS, RunError

    try:
        main(standalone_mode=True)
    except USER_ERRORS as e:  # pragma: no cover - exercised through subprocess tests
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RunError as e:  # pragma: no cover - exercised through subprocess tests
        # The message names what failed, what was kept and how to resume; the traceback
        # of a Ray task adds nothing a user can act on (WEBCURATE_DEBUG=1 shows it).
        if os.environ.get("WEBCURATE_DEBUG") == "1":
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
