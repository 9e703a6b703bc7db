"""``offsite cloud simulate``: a federated job's rounds on Flower's simulation engine, many virtual
data owners on one host.

The apps are the deployment's own: :data:`offsite.cloud.federate.app.app` drives the rounds and
:data:`offsite.client.client_app.app` trains, each virtual owner on its share of a task file. They
run under ``flwr.simulation`` with the Ray backend: every ClientApp call runs in one of a pool of
Ray actors (``max_parallel`` of them, ``cpus_per_client`` CPUs each), the ServerApp in a thread
of this process. The job directory ends as a deployment run leaves it (``checkpoints/``,
``state.json``, ``updates/`` with ``record_updates``), plus::

    sim/partitions/owner-K.jsonl, split.json   the owners' shares (unless --partitions names a directory)
    sim/cache/                                 the virtual owners' bundle cache (one, keyed by digest)

How settings reach the two apps (flwr 1.41):

- The ServerApp reads ``job-dir`` from its run config. The public ``flwr.simulation.run_simulation``
  hands the ServerApp an empty run config, so :func:`run_flower_simulation` calls the function
  under it, ``flwr.simulation.run_simulation._run_simulation`` (flwr's own ``flwr-simulation``
  process calls it the same way), with a ServerApp context whose run config is
  ``{"job-dir": JOB}``: what ``flwr run -c "job-dir='JOB'"`` gives it in a deployment. flwr is
  pinned to 1.41.x in pyproject.toml; this one call is the only private API used.
- A virtual SuperNode's node config holds only ``partition-id`` and ``num-partitions``; where its
  data and cache are comes from ``$OFFSITE_SIMULATION``, set here before Ray starts (see
  :mod:`offsite.protocol.simulation`). The coordinator never names a data path.

A second ``simulate`` on the same job resumes after its last completed round, as a restarted
ServerApp does.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from offsite.cloud.fed_job import JobState, load_state, read_job
from offsite.cloud.superlink import round_summary
from offsite.harness.split import add_split_arguments, format_table, split_args_alpha, split_file
from offsite.protocol.flower_process import FLWR_DISABLE_INSTALL
from offsite.protocol.simulation import SIMULATION_ENV, SimulatedOwners, partition_file_name

log = logging.getLogger(__name__)

SIM_DIR = "sim"
OWNER_FILE = re.compile(r"^owner-(\d+)\.jsonl$")


class SimulationError(RuntimeError):
    """The simulation could not start or did not complete every round; the message says why."""


@dataclass(frozen=True)
class SimulationConfig:
    """How the virtual owners run (Ray backend settings)."""

    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    max_parallel: int | None = None  # virtual owners training at once; default: this host's CPUs // cpus_per_client
    verbose: bool = False  # flwr's debug logging

    def __post_init__(self) -> None:
        if not self.cpus_per_client > 0 or self.gpus_per_client < 0:
            raise ValueError(
                "cpus per client must be > 0 and gpus per client >= 0 "
                f"(got {self.cpus_per_client}, {self.gpus_per_client})"
            )
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"max parallel clients must be >= 1, got {self.max_parallel}")

    @property
    def parallel(self) -> int:
        if self.max_parallel is not None:
            return self.max_parallel
        return max(1, int((os.cpu_count() or 1) // self.cpus_per_client))

    @property
    def threads(self) -> int:
        """torch CPU threads per virtual owner."""
        return max(1, int(self.cpus_per_client))

    @property
    def device(self) -> str:
        return "auto" if self.gpus_per_client > 0 else "cpu"

    def backend_config(self) -> dict:
        """Flower's Ray backend config: Ray gets ``parallel * cpus_per_client`` CPUs, so that many owners
        train at once."""
        return {
            "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": self.gpus_per_client},
            "init_args": {"num_cpus": math.ceil(self.parallel * self.cpus_per_client), "include_dashboard": False},
        }


# ---------------------------------------------------------------- partitions


def sim_dir(job_dir: Path) -> Path:
    return Path(job_dir) / SIM_DIR


def write_partitions(
    job_dir: Path, data: Path, clients: int, alpha: float | None, seed: int, min_rows: int = 1
) -> dict:
    """Split ``data`` among ``clients`` owners into ``JOB/sim/partitions``; return ``split.json``'s content."""
    return split_file(data, sim_dir(job_dir) / "partitions", clients, alpha, seed, min_rows)


def count_partitions(partitions: Path) -> int:
    """The number of owners in ``partitions``: its files must be ``owner-0.jsonl`` ... ``owner-{N-1}.jsonl``."""
    partitions = Path(partitions)
    if not partitions.is_dir():
        raise FileNotFoundError(f"{partitions}: no such partitions directory")
    found = sorted(int(m.group(1)) for p in partitions.iterdir() if (m := OWNER_FILE.match(p.name)))
    if not found:
        raise FileNotFoundError(
            f"{partitions}: no {partition_file_name(0)} ... files (write them with `offsite cloud split`)"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{partitions / partition_file_name(missing[0])}: missing (the owners must be numbered 0..{max(found)})"
        )
    return len(found)


# ---------------------------------------------------------------- the run


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (Ray's processes inherit them), then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def quiet_logging() -> Iterator[None]:
    """flwr's console handler prints the rounds: keep its records (DEBUG included) from reaching the
    root handler a second time, and silence the SQL migrations and Ray's accelerator tip."""
    flwr, alembic = logging.getLogger("flwr"), logging.getLogger("alembic")
    saved = flwr.propagate, alembic.level
    flwr.propagate = False
    alembic.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            yield
    finally:
        flwr.propagate = saved[0]
        alembic.setLevel(saved[1])


def run_flower_simulation(job_dir: Path, clients: int, config: SimulationConfig) -> None:
    """The ServerApp and ClientApp on ``clients`` virtual SuperNodes (Ray backend) until the ServerApp returns.

    An exception of the ServerApp (a failed round, a broken job) is raised here once the
    simulation engine has stopped. Ray is shut down either way.
    """
    try:
        with quiet_logging():
            _run_simulation(job_dir, clients, config)
    finally:
        import ray  # heavy optional: Ray is the simulation backend, loaded only when a simulation ran

        if ray.is_initialized():  # the backend shuts Ray down when it stops; not if it failed to start
            ray.shutdown()


def _run_simulation(job_dir: Path, clients: int, config: SimulationConfig) -> None:
    # heavy: Flower's simulation engine (Ray) and the torch-loading apps, imported only for a simulation run
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation as flower_run_simulation
    from flwr.supercore.telemetry import EventType

    from offsite.client.client_app import app as client_app
    from offsite.cloud.federate.app import app as server_app

    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={"job-dir": str(job_dir)})
    flower_run_simulation(
        num_supernodes=clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=config.backend_config(),
        server_app_context=context,
        verbose_logging=config.verbose,
    )


def require_simulation_engine() -> None:
    """Refuse, saying what to install, where Flower's simulation engine (Ray, an optional extra) is missing."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(
            "offsite cloud simulate runs on Flower's simulation engine (Ray), which is not installed here: "
            "pip install 'offsite[simulation]' (make setup-dev installs it)"
        )


def simulate_job(job_dir: Path, partitions: Path, config: SimulationConfig = SimulationConfig()) -> JobState:
    """Run the job's remaining rounds with one virtual owner per file in ``partitions``; return the final state."""
    require_simulation_engine()
    job_dir = Path(job_dir).resolve()
    job = read_job(job_dir)
    clients = count_partitions(partitions)
    if clients < job.min_nodes:
        raise ValueError(
            f"{job_dir / 'job.json'}: min_nodes is {job.min_nodes}, "
            f"more than the {clients} simulated owners in {partitions}"
        )
    owners = SimulatedOwners(
        Path(partitions).resolve(), clients, sim_dir(job_dir) / "cache", config.device, config.threads
    )
    log.info(
        "simulating %d owner(s) from %s, %d at a time (%g CPU each)",
        clients,
        partitions,
        config.parallel,
        config.cpus_per_client,
    )
    with environment({SIMULATION_ENV: owners.to_env(), FLWR_DISABLE_INSTALL: "1"}):
        run_flower_simulation(job_dir, clients, config)
    state = load_state(job_dir)
    if state is None or state.completed_round < job.rounds:
        done = 0 if state is None else state.completed_round
        raise SimulationError(
            f"{job_dir}: the simulation ended after {done} of {job.rounds} round(s); see the log above"
        )
    return state


# ---------------------------------------------------------------- command line


def register(commands) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="run a federated job's rounds on Flower's simulation engine (Ray) with many virtual data owners",
        description="Run the job's ServerApp and ClientApp (the deployment's own) on Flower's simulation engine: one "
        "virtual data owner per share of a task file, split into JOB/sim/partitions (--data with --iid or --alpha), or "
        "one per owner-K.jsonl in --partitions DIR (as `offsite cloud split` writes them). The job directory ends with "
        "the same checkpoints/ and state.json as a deployment run; "
        "a second run resumes after the last completed round.",
    )
    simulate.add_argument(
        "--job",
        required=True,
        type=Path,
        metavar="JOB",
        help="job directory with job.json and bundle/ (`offsite cloud prepare`)",
    )
    simulate.add_argument(
        "--partitions",
        type=Path,
        metavar="DIR",
        help="directory of pre-split owner-0.jsonl ... files (instead of --data)",
    )
    add_split_arguments(simulate.add_argument_group("split (instead of --partitions)"), required=False)
    ray = simulate.add_argument_group("simulation engine (Ray)")
    ray.add_argument(
        "--cpus-per-client",
        type=float,
        metavar="C",
        default=1.0,
        help="CPUs per virtual owner; also its torch threads (default 1)",
    )
    ray.add_argument(
        "--gpus-per-client",
        type=float,
        metavar="G",
        default=0.0,
        help="GPUs (or a fraction) per virtual owner; 0 trains on CPU (default 0)",
    )
    ray.add_argument(
        "--max-parallel",
        type=int,
        metavar="P",
        default=None,
        help="virtual owners training at once (default: CPUs // --cpus-per-client)",
    )
    ray.add_argument("--flower-debug", action="store_true", help="flwr's debug logging")
    simulate.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    require_simulation_engine()  # before the owners' shares are written
    config = SimulationConfig(args.cpus_per_client, args.gpus_per_client, args.max_parallel, args.flower_debug)
    if (args.partitions is None) == (args.data is None):
        raise ValueError("give the owners' data: --data FILE --clients N (--iid | --alpha A), or --partitions DIR")
    partitions = args.partitions
    if partitions is None:
        if args.clients is None:
            raise ValueError("--data needs --clients N")
        summary = write_partitions(args.job, args.data, args.clients, split_args_alpha(args), args.seed, args.min_rows)
        partitions = sim_dir(args.job) / "partitions"
        print(f"{summary['rows']} rows of {args.data} split among {args.clients} owners into {partitions}")
        print(format_table(summary), flush=True)
    elif args.clients is not None and args.clients != count_partitions(partitions):
        raise ValueError(f"--clients {args.clients}, but {partitions} holds {count_partitions(partitions)} owner files")
    try:
        state = simulate_job(args.job, partitions, config)
    except RuntimeError as error:  # SimulationError, or the ServerApp's (a round without enough replies)
        print(f"offsite: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    for line in round_summary(args.job):
        print(line)
    print(f"global adapter after round {state.completed_round}: {Path(args.job) / state.checkpoint}")
    return 0
