"""The ``memmgr`` command line: ``bench`` (the main job), ``report`` and ``doctor``.

Every argument is checked before anything runs; a bad one ends the command with one line, ``Error: <option>: what
it got and what to give``, and exit status 2, never a traceback (``ArgumentError``).

This module imports only click (and the ``memmgr`` package, which imports no torch until one of its names is
used): each command imports what it needs (its tools module, torch, tqdm, matplotlib) when it runs, so ``--help``
and ``--version`` stay quick. Logging goes to stderr through ``tqdm.write``, so log lines do not glue onto a
progress bar; memmgr's own logger is at INFO (DEBUG with ``-v``), every other library's at WARNING."""
from __future__ import annotations

import logging
import os
import sys

try:
    import click
except ImportError:  # the tools extra is not installed: say how to get it rather than fail with a traceback
    sys.exit("memmgr's command-line tools need the tools extra (click, tqdm, matplotlib, numpy): from a memmgr "
             "checkout, pip install -e \".[tools]\" (or pip install click tqdm matplotlib numpy)")

logger = logging.getLogger("memmgr")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class ArgumentError(click.ClickException):
    """A command-line argument that cannot be used: printed as one ``Error:`` line, exit status 2 (as click's own
    usage errors)."""

    exit_code = 2


def _checked(check, *args, **kwargs):
    """``check(*args, **kwargs)``, a MemmgrInputError becoming an ArgumentError."""
    from memmgr.errors import MemmgrInputError

    try:
        return check(*args, **kwargs)
    except MemmgrInputError as exc:
        raise ArgumentError(str(exc)) from None


class TqdmLogHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write`` (to this handler's stream), which clears any progress bar on the
    line, prints the record and redraws the bar; a plain stream write where tqdm is not installed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def configure_logging(verbose: bool) -> bool:
    """Sends log records to stderr through ``TqdmLogHandler``, memmgr's at DEBUG (``verbose``) or INFO and every
    other logger's at WARNING (the root logger's level), and returns True. Does nothing and returns False where the
    root logger already has a handler (a program that configured logging itself, pytest's capture)."""
    root = logging.getLogger()
    if root.handlers:
        return False
    handler = TqdmLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return True


def package_version() -> str:
    """memmgr's version from the installed distribution's metadata; ``memmgr.__version__`` when it is not installed
    (run from a source tree)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("memmgr")
    except importlib.metadata.PackageNotFoundError:
        from memmgr import __version__

        return __version__


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"memmgr {package_version()}")
    ctx.exit()


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print memmgr's version and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Log memmgr's debug messages (other libraries stay at WARNING).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Free and restore GPU training state between RL phases, at PCIe speed."""
    if configure_logging(verbose):
        logger.debug("memmgr %s, Python %s: running %r with memmgr's debug log", package_version(),
                     sys.version.split()[0], ctx.invoked_subcommand)


@main.command()
@click.option("--out", default="memmgr-bench", show_default=True, help="Directory for JSON, Markdown and PNG.")
@click.option("--size-gb", type=float, default=None,
              help="State size in GB, checked against the memory there is (default: fits the free memory).")
@click.option("--sweep", is_flag=True, help="Also sweep state sizes and tensor counts.")
@click.option("--cycles", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Offload/onload cycles per method (memmgr runs at least 5).")
@click.option("--methods", default=None,
              help="Comma-separated subset of methods to run: memmgr, per_tensor_to_cpu_non_blocking, "
                   "per_tensor_cpu_pageable, torch_memory_saver, megatron_builtin.")
@click.option("--megatron/--no-megatron", default=None, help="Use a real megatron-core GPT when installed.")
@click.option("--phase-gap", type=click.FloatRange(min=0), default=None,
              help="Untimed seconds after each offload and onload, standing in for the phases in between "
                   "[default: 0.5 on a GPU, 0 on the CPU path]; 0 times back-to-back cycles.")
@click.option("--between", default=None,
              help="What stands between offload and onload, comma-separated: 'engine' (another process takes the "
                   "freed GPU memory and releases it right before the onload, as in a colocated RL loop) and/or "
                   "'pause' (an untimed pause) [default: engine,pause on a GPU, pause on the CPU path].")
@click.option("--gpt", type=click.Choice(["1.3b", "4b"]), default="1.3b", show_default=True,
              help="The megatron-core GPT: the 1.3B (every peer beside memmgr) or a 3.7B (~52 GB each way; with "
                   "--methods memmgr, as the peers' own buffers do not fit beside it).")
def bench(out: str, size_gb: float | None, sweep: bool, cycles: int, methods: str | None,
          megatron: bool | None, phase_gap: float | None, between: str | None, gpt: str) -> None:
    """Time offload/onload against the link's peak and against peers (the main job)."""
    from memmgr.tools import bench as bench_module

    options = dict(out=out, size_gb=size_gb, sweep=sweep, cycles=cycles,
                   methods=methods.split(",") if methods is not None else None, megatron=megatron,
                   phase_gap_s=phase_gap, between=between.split(",") if between is not None else None, gpt=gpt)
    _checked(bench_module.check_arguments, **options)
    _checked(bench_module.run_bench, **options)
    _end_before_peer_teardown()


def _end_before_peer_teardown() -> None:
    """Ends the process at once, its files written and its output flushed, where a peer's native teardown at exit
    would abort it (``bench_methods.teardown_unsafe_at_exit``): the run succeeded, and its exit status says so."""
    from memmgr.tools.bench_methods import teardown_unsafe_at_exit

    if not teardown_unsafe_at_exit():
        return
    logging.getLogger("memmgr").info("ending without the interpreter's teardown: torch_memory_saver's free hook "
                                     "aborts when its pools are released outside a region, as they are at exit")
    for handler in logging.getLogger().handlers + logging.getLogger("memmgr").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.argument("logs", nargs=-1, required=True)
@click.option("--plot", default=None, help="Write a PNG timeline here (a path ending in .png).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def report(logs: tuple[str, ...], plot: str | None, as_json: bool) -> None:
    """Render memory ledgers (JSON Lines written by memmgr.ledger.Ledger: files, directories, globs or {rank}
    patterns) as a table, JSON or a PNG. Fails when a path holds no snapshot."""
    from memmgr.tools.report import check_plot, load_snapshots, render_logs

    _checked(check_plot, plot)
    records = _checked(load_snapshots, list(logs))
    render_logs(list(logs), plot=plot, as_json=as_json, records=records)


@main.command()
@click.option("--quick", is_flag=True, help="Smaller transfers (faster, less precise).")
def doctor(quick: bool) -> None:
    """Check this machine for what will slow offload down (link, pinning, limits, versions)."""
    from memmgr.tools.doctor import run_doctor

    run_doctor(quick=quick)


if __name__ == "__main__":
    main()
