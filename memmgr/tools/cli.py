"""The ``memmgr`` command line: ``bench`` (the main job), ``report`` and ``doctor``."""
from __future__ import annotations

import logging
import os
import sys

try:
    import click
except ImportError:  # the tools extra is not installed: say how to get it rather than fail with a traceback
    sys.exit("memmgr's command-line tools need the tools extra: pip install 'memmgr[tools]'")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log memmgr's debug messages.")
def main(verbose: bool) -> None:
    """Free and restore GPU training state between RL phases, at PCIe speed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--out", default="memmgr-bench", show_default=True, help="Directory for JSON, Markdown and PNG.")
@click.option("--size-gb", type=float, default=None, help="State size in GB (default: fits the free memory).")
@click.option("--sweep", is_flag=True, help="Also sweep state sizes and tensor counts.")
@click.option("--cycles", type=int, default=3, show_default=True, help="Offload/onload cycles per method.")
@click.option("--methods", default=None, help="Comma-separated subset of methods to run.")
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
    from memmgr.tools.bench import run_bench

    run_bench(out=out, size_gb=size_gb, sweep=sweep, cycles=cycles,
              methods=methods.split(",") if methods else None, megatron=megatron, phase_gap_s=phase_gap,
              between=between.split(",") if between else None, gpt=gpt)
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
@click.argument("logs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--plot", default=None, help="Write a PNG timeline here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def report(logs: tuple[str, ...], plot: str | None, as_json: bool) -> None:
    """Render memory ledgers (JSON Lines written by memmgr.ledger.Ledger) as a table, JSON or a PNG."""
    from memmgr.tools.report import render_logs

    render_logs(list(logs), plot=plot, as_json=as_json)


@main.command()
@click.option("--quick", is_flag=True, help="Smaller transfers (faster, less precise).")
def doctor(quick: bool) -> None:
    """Check this machine for what will slow offload down (link, pinning, limits, versions)."""
    from memmgr.tools.doctor import run_doctor

    run_doctor(quick=quick)


if __name__ == "__main__":
    main()
