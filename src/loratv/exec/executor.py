"""Run a command's units of work here or on Ray, with results returned in job order.

A unit of work is a module-level function called with picklable arguments (paths, names, options — never tensors)
that opens its inputs itself, writes its own output file and returns only metadata. `LocalExecutor` calls it in
this process, one job after another; `RayExecutor` submits every job as a Ray task and gathers the results in job
order, so the caller sums partials and writes records exactly as it would locally. A task whose worker dies is
retried by Ray (`max_retries`); a task must therefore be idempotent: it rewrites its output file from scratch.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loratv.errors import BadInputError, LoratvError, param

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'loratv[ray]'"
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class ExecutorSpec:
    """Which executor: "local", or "ray" with an optional cluster address (None: RAY_ADDRESS, else a new local
    Ray instance; "auto": the running cluster; "ray://host:10001": Ray Client)."""

    kind: str = "local"
    address: str | None = None

    def __str__(self) -> str:
        return self.kind if self.address is None else f"{self.kind}={self.address}"


def parse_executor(text: "str | ExecutorSpec | None", device: object = "cpu") -> ExecutorSpec:
    """Read `local`, `ray` or `ray=ADDRESS` (the form of `--executor`), checked against the command's device.

    Args:
        text: the option's value, an ExecutorSpec, or None (local).
        device: the command's --device: Ray tasks are scheduled on CPUs, so only "cpu" goes with Ray.

    Returns:
        The executor's spec.

    Raises:
        BadInputError: another name, an empty address, or Ray with a GPU device.
    """
    if text is None or isinstance(text, ExecutorSpec):
        spec = text or ExecutorSpec()
    else:
        kind, sep, address = str(text).partition("=")
        kind = kind.strip().lower()
        if kind not in EXECUTORS or (sep and (kind != "ray" or not address.strip())):
            raise BadInputError(f"{param('executor', text)}: choose local, ray or ray=ADDRESS (e.g. ray=auto, "
                                "ray=ray://head:10001).")
        spec = ExecutorSpec(kind, address.strip() or None)
    if spec.kind == "ray" and str(device) != "cpu":
        raise BadInputError(f"{param('executor', str(spec))} schedules its tasks on CPUs; {param('device', device)} "
                            "runs with the local executor only.")
    return spec


class LocalExecutor:
    """Runs each job in this process, in order."""

    workers = 1

    def map(self, task: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        """Call task(*job) for each job, in order.

        Args:
            task: the unit of work.
            jobs: its argument tuples.

        Returns:
            The results, in job order.
        """
        return [task(*job) for job in jobs]

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """Runs each job as a Ray task with the driver's thread count (and as many CPUs reserved, up to a node's),
    connecting to (or starting) a Ray instance once."""

    def __init__(self, address: str | None = None, *, max_retries: int = DEFAULT_RETRIES):
        """Connect to Ray, unless this process is connected already (then that session is used as it is).

        Args:
            address: as ray.init's: None (RAY_ADDRESS, else a new local instance), "auto", "host:port" or
                "ray://host:port".
            max_retries: how many times Ray reruns a task whose worker process died.

        Raises:
            LoratvError: Ray is not installed, or the cluster cannot be reached.
        """
        try:
            import ray
        except ImportError:
            raise LoratvError(f"{param('executor', 'ray')} needs Ray, which is not installed: {RAY_INSTALL}.") from None
        self._ray = ray
        self.max_retries = max_retries
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                shown = address or "a new local instance"
                raise LoratvError(f"Ray cluster {shown}: cannot connect ({exc}).") from None
            self._started = True
        self._remote: Any = None  # the Ray remote function, made on first use

    @property
    def workers(self) -> int:
        """The CPUs the cluster offers."""
        return int(self._ray.cluster_resources().get("CPU", 1))

    def map(self, task: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        """Submit every job as a task of `task` and wait for all of them.

        Args:
            task: a module-level function (Ray ships it by reference; the workers import loratv).
            jobs: its argument tuples (small and picklable: paths and options).

        Returns:
            The results, in job order.

        Raises:
            LoratvError: a task raised one (re-raised as it is, once every other task has stopped), a worker died
                more than `max_retries` times, or the workers cannot import loratv.
        """
        ray = self._ray
        # the driver's intra-op thread count: torch's reductions and MKL split work by it, so a task computes the
        # local run's bits only with the same count (docs/scaling.md); each task reserves as many CPUs (at most a
        # node's), so that tasks sharing a node do not oversubscribe it
        threads = torch.get_num_threads()
        if self._remote is None:
            self._remote = ray.remote(num_cpus=min(threads, self._node_cpus()),
                                      max_retries=self.max_retries)(_run_task)
        shipped = task_wrapper(task)
        refs = [self._remote.remote(shipped, threads, *job) for job in jobs]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            # the others may still be writing into the output's temporary folder: stop them before it is removed
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise _task_failure(exc, task) from None

    def _node_cpus(self) -> int:
        """The CPUs of the cluster's largest live node (a task reserving more could never be scheduled)."""
        cpus = [node.get("Resources", {}).get("CPU", 0) for node in self._ray.nodes() if node.get("Alive")]
        return max(1, int(max(cpus, default=1)))

    def close(self) -> None:
        """Disconnect from Ray if this executor connected (a session the caller started stays up)."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def _run_task(task: Callable[..., Any], threads: int, *job: Any) -> Any:
    """In a Ray worker: run one job with the driver's intra-op thread count."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return task(*job)


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """What a Ray task runs: the task itself (the seam tests use to inject faults into workers).

    Args:
        task: the unit of work.

    Returns:
        The callable shipped to the workers.
    """
    return task


def _task_failure(exc: BaseException, task: Callable[..., Any]) -> LoratvError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LoratvError):
        return cause
    if isinstance(cause, ImportError):
        return LoratvError(f"Ray workers cannot import loratv ({cause}); install it on every node ({RAY_INSTALL}, "
                           "or a runtime_env).")
    name = getattr(task, "__name__", "task")
    first = str(cause or exc).strip().splitlines()
    return LoratvError(f"a Ray task ({name}) failed: {first[-1] if first else type(exc).__name__}.")


def make_executor(spec: "str | ExecutorSpec | None") -> "LocalExecutor | RayExecutor":
    """The executor a spec names, connected.

    Args:
        spec: "local", "ray", "ray=ADDRESS", an ExecutorSpec, or None (local).

    Returns:
        A LocalExecutor or a RayExecutor; call close() when done.

    Raises:
        LoratvError: a bad spec (BadInputError), Ray not installed, or a cluster that cannot be reached.
    """
    parsed = parse_executor(spec)
    return LocalExecutor() if parsed.kind == "local" else RayExecutor(parsed.address)


def run_tasks(spec: "str | ExecutorSpec | None", task: Callable[..., Any], jobs: Sequence[tuple]) -> list:
    """Run every job on the executor a spec names, connecting for the call and disconnecting after it.

    Args:
        spec: "local", "ray", "ray=ADDRESS", an ExecutorSpec, or None (local).
        task: the unit of work (a module-level function).
        jobs: its argument tuples.

    Returns:
        The results, in job order.

    Raises:
        LoratvError: as make_executor, or a task's refusal (see RayExecutor.map).
    """
    executor = make_executor(spec)
    try:
        return executor.map(task, jobs)
    finally:
        executor.close()


def byte_groups(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Cut items, in order, into consecutive groups of at most max_bytes each (a bigger item gets a group to itself).

    Args:
        sizes: each item's size in bytes.
        max_bytes: the group size limit.

    Returns:
        Lists of item positions, in order; empty for no items.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > max_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups
