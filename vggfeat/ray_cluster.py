"""A Ray cluster as the Ray engine sees it: connected to, or a local instance of our own.

Connecting fails in seconds, in one line, where Ray itself would wait: nothing
at the address, something there that is no Ray head, a cluster that wants a
token. A local instance lives in a temporary folder of its own and is ended,
every process of it, with the process that started it (``ray_reaper.py``),
however that process ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from vggfeat.errors import OptionError, VggfeatError
from vggfeat.runtime import muted_stderr

if TYPE_CHECKING:
    from vggfeat.ray_engine import RayOptions

#: Seconds to wait for a Ray cluster to answer when connecting.
CONNECT_SECONDS = float(os.environ.get("VGGFEAT_RAY_CONNECT_SECONDS", "60"))


class Session:
    """A connection to a Ray cluster, or a local instance of our own, and what it has."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.verbose = options.verbose
        self._reaper: subprocess.Popen[bytes] | None = None
        self._stdout: IO[str] | None = None
        self.connected = False

    @classmethod
    def connect(cls, options: RayOptions) -> Session:
        import ray

        session = cls(options)
        try:
            if not ray.is_initialized():  # else the caller's own Ray session, left as it is
                session._connect()
            session._describe()
        except BaseException:
            session.close()
            raise
        return session

    def _connect(self) -> None:
        import ray

        address = self.options.address
        if not self.verbose:
            # Ray's C++ side logs to stderr after start-up too, and so does TensorFlow in the
            # workers it starts: INFO and warnings stay out.
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        if address and address != "auto":
            _check_reachable(address)
        options: dict[str, Any] = {"address": address}
        if not address:
            options = {"address": "local", "_temp_dir": self._start_reaper()}
        where = f"at {address}" if address else "locally"
        # ray.init sets SIGTERM and SIGINT handlers that exit at once; vggfeat's commit first.
        handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
        # Something that listens at the address but is no Ray makes ray.init wait forever.
        timer = Watchdog(CONNECT_SECONDS)
        try:
            with muted_stderr(enabled=not self.verbose), timer, timer.waiting():
                ray.init(
                    include_dashboard=False,
                    log_to_driver=self.verbose,
                    logging_level=logging.INFO if self.verbose else logging.ERROR,
                    configure_logging=True,
                    # TensorFlow's start-up notes in the workers would reach this terminal.
                    runtime_env={} if self.verbose else {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}},
                    **options,
                )
            self.connected = True
        except KeyboardInterrupt:
            if not timer.stalled:
                raise
            raise VggfeatError(
                f"no Ray cluster answered {where} within {CONNECT_SECONDS:g} s; check "
                "--ray-address (the head node's address, as 'ray start --head' printed it) "
                "or use auto"
            ) from None
        except (ConnectionError, RuntimeError, ValueError) as error:
            reasons = _reasons(error)
            hint = (
                "the cluster requires token authentication: set RAY_AUTH_MODE=token (and its "
                "token) here as on the cluster, or run on the head node with --ray-address auto"
                if "auth" in reasons.lower()
                else "start one with 'ray start --head', or leave out --ray-address for a local "
                "instance"
            )
            raise VggfeatError(
                f"cannot connect to a Ray cluster {where}: {reasons}; {hint}"
            ) from None
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        # Ray prints the cluster's error messages ("(raylet) Task ... will be retried")
        # on sys.stdout from a thread of its own; stdout carries only what was asked for.
        self._stdout = sys.stdout
        sys.stdout = sys.stderr if self.verbose else open(os.devnull, "w")  # noqa: SIM115
        _quiet_ray_data(self.verbose)

    def _start_reaper(self) -> str:
        """A folder for the local instance, and the process that ends it with us."""
        parent = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
        folder = tempfile.mkdtemp(prefix="vggfeat-ray-", dir=parent)
        self._reaper = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("ray_reaper.py")), str(os.getpid()),
             folder],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # out of reach of the terminal's Ctrl-C: we decide
        )  # fmt: skip
        return folder

    def _describe(self) -> None:
        import ray

        resources = ray.cluster_resources()
        alive = [node for node in ray.nodes() if node.get("Alive")]
        self.nodes = len(alive)
        self.gpus = float(resources.get("GPU", 0))
        self.cpus = float(resources.get("CPU", 0))
        self.node_ips = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in alive}
        self.memory = [float(node.get("Resources", {}).get("memory", 0)) for node in alive]

    def gpus_per_actor(self, options: RayOptions) -> float:
        if options.gpus_per_actor is not None:
            return options.gpus_per_actor
        return 1.0 if self.gpus else 0.0

    def largest_memory(self) -> float:
        return max(self.memory, default=0.0)

    def on_every_node(self, function: Any) -> list[Any]:
        """``function()`` run once on every node of the cluster."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(num_cpus=0)(function)
        calls = [
            remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote()
            for node in self.node_ips
        ]
        try:
            return ray.get(calls, timeout=60)
        except ray.exceptions.GetTimeoutError:
            raise VggfeatError("the Ray cluster's nodes did not answer within 60 s") from None

    def check_visible(self, paths: Sequence[str]) -> None:
        """Every node must see the inputs: ask each one for the first image."""
        here = next((path for path in paths if os.path.exists(path)), None)
        if here is None:
            return  # no input exists even here: each is recorded as a failure
        sample = os.path.abspath(here)
        seen = self.on_every_node(lambda: (node_id(), os.path.exists(sample)))
        blind = [self.node_ips.get(node, node) for node, found in seen if not found]
        if blind:
            raise VggfeatError(
                f"Ray nodes {', '.join(blind)} do not see {sample}: inputs must be on a file "
                "system every node mounts at the same path"
            )

    def close(self) -> None:
        import ray

        if self.connected and ray.is_initialized():
            with muted_stderr(enabled=not self.verbose):
                ray.shutdown()
        self.connected = False
        if self._reaper is not None:
            self._reaper.communicate(timeout=60)  # its input closes: it ends the instance
            self._reaper = None
        if self._stdout is not None:
            if sys.stdout is not sys.stderr:
                sys.stdout.close()
            sys.stdout, self._stdout = self._stdout, None


def _reasons(error: BaseException | None) -> str:
    """The first line of an error and of each error that caused it, once each."""
    lines: list[str] = []
    while error is not None and len(lines) < 4:
        line = first_line(error)
        if line not in lines:
            lines.append(line)
        error = error.__cause__ or error.__context__
    return ": ".join(lines)


def check_address(address: str) -> tuple[str, int]:
    """The host and port of ``--ray-address``; ``OptionError`` unless auto, HOST:PORT or ray://."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"--ray-address {address} is not auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


#: What an HTTP/2 client says first; a Ray head (gRPC) answers with a SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_reachable(address: str) -> None:
    """A clear error within seconds when nothing at ``address`` answers as a Ray head does:
    Ray itself retries for 40 s, deaf to Ctrl-C, where something else listens."""
    host, port = check_address(address)
    try:
        with socket.create_connection((host, port), timeout=10) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS head answers no plain HTTP/2
            connection.settimeout(CONNECT_SECONDS)
            connection.sendall(HTTP2_PREFACE)
            try:
                frame = connection.recv(9)
            except TimeoutError:
                frame = b""
    except OSError as error:
        raise VggfeatError(
            f"no Ray cluster answers at {address} ({error.strerror or error}); start one with "
            "'ray start --head', or leave out --ray-address for a local instance"
        ) from None
    if len(frame) < 4 or frame[3] != 0x04:
        raise VggfeatError(
            f"no Ray cluster answered at {address} within {CONNECT_SECONDS:g} s: something "
            "listens there, but not as a Ray head does; check --ray-address (the head node's "
            "address, as 'ray start --head' printed it) or use auto"
        )


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars and logs stay out of the terminal unless asked for."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = verbose
    with contextlib.suppress(AttributeError):
        context.print_on_execution_start = verbose
    # Ray Data logs a failed task's whole traceback at ERROR; vggfeat says it in one line.
    level = logging.INFO if verbose else logging.CRITICAL
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Watchdog:
    """Interrupts the main thread when it has waited ``limit`` seconds in ``waiting()``."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.stalled = False
        self._since: float | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The main thread waits for results here; only this time counts."""
        with self._lock:
            self._since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._since = None

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._done.wait(min(1.0, self.limit / 4)):
            with self._lock:
                if self._since is None or time.monotonic() - self._since <= self.limit:
                    continue
                self.stalled = True
                # A real signal to the main thread: it wakes a wait on a lock, which
                # _thread.interrupt_main() would not.
                if main is not None:
                    signal.pthread_kill(main, signal.SIGINT)
                return


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
