"""The ``adapterforge`` command line.

``adapterforge up`` runs the whole service on one machine (the API in this process, one Celery
worker as a child process); ``adapterforge worker`` runs one worker in the foreground for
production. Server-side modules are imported inside the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from adapterforge import __version__

logger = logging.getLogger("adapterforge")

#: How long a stopping worker may take to hand its job back before it is killed.
WORKER_STOP_TIMEOUT = 30.0
#: On Ctrl-C, how long open requests (a generation streaming its tokens) may take to finish before the
#: API closes them; job event streams end at once.
GRACEFUL_SHUTDOWN_SECONDS = 5
#: A worker that dies sooner than this after starting is restarted after a growing delay.
WORKER_MIN_UPTIME = 30.0
#: Set in the environment of the worker that ``adapterforge up`` starts: the worker exits when
#: this process is gone (see ``worker.celery_app``).
SUPERVISOR_PID_ENV = "ADAPTERFORGE_SUPERVISOR_PID"
#: Settings that a flag of this CLI also sets (named in errors along with the variable).
_FLAGS = {"host": "--host", "port": "--port"}


class CliError(Exception):
    """A failure the user can fix: logged as one line (no traceback); ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _settings(**overrides: Any) -> Any:
    """``Settings(**overrides)``, or :class:`CliError` (exit 2) naming each bad variable or flag."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a check of several settings together: its input is every setting, secrets too
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            where = f"ADAPTERFORGE_{field.upper()}" + (f" / {_FLAGS[field]}" if field in _FLAGS else "")
            problems.append(f"{where}: {error['msg']} (got {_without_password(error.get('input'))!r})")
        raise CliError("invalid settings: " + "; ".join(problems), code=2) from None
    except SettingsError as exc:  # a value the environment source cannot even parse (JSON lists)
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        raise CliError(f"invalid settings: ADAPTERFORGE_{field.upper()}: {exc} (lists are JSON: "
                       f'\'["a", "b"]\')', code=2) from None


def _without_password(value: Any) -> Any:
    """``value`` with the password of a ``scheme://user:password@host`` URL starring out."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        credentials, _, host = rest.rpartition("@")
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return value


def _check_port_free(host: str, port: int) -> None:
    """:class:`CliError` when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CliError(f"cannot serve on {host}:{port} (ADAPTERFORGE_HOST / --host): {exc}", code=2) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise CliError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (another server there? "
                           "pick one with --port)") from None


def _database_error(url: str, exc: Exception) -> CliError:
    """A :class:`CliError` for a database that cannot be used, the URL shown without its password."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL
        shown = url.split("@")[-1] if "@" in url else url
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return CliError(f"cannot use the database {shown}: {reason}")


def worker_command(pool: str = "solo", concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line: the ``gpu`` queue, one job at a time by default."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu",
            "-P", pool, "-c", str(concurrency), "--loglevel", loglevel]


class WorkerSupervisor:
    """Runs the worker as a child process and starts a new one when it dies unexpectedly (the
    reconciler then re-enqueues its job, which resumes from its last checkpoint)."""

    def __init__(self, command: list[str], *, stop_timeout: float = WORKER_STOP_TIMEOUT, poll: float = 0.5) -> None:
        self._command, self._stop_timeout, self._poll = command, stop_timeout, poll
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        """The current worker process's id."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        # its own session: a terminal's Ctrl-C reaches only this process, which then stops the worker
        self._proc = subprocess.Popen(self._command, env=env, start_new_session=True)
        self._started_at = time.monotonic()
        logger.info("worker started (pid %d): %s", self._proc.pid, " ".join(self._command[1:]))

    def _watch(self) -> None:
        quick_deaths = 0
        while not self._stopping.wait(self._poll):
            with self._lock:
                proc = self._proc
                if proc is None or self._stopping.is_set() or (code := proc.poll()) is None:
                    continue
                uptime = time.monotonic() - self._started_at
            quick_deaths = quick_deaths + 1 if uptime < WORKER_MIN_UPTIME else 0
            delay = min(2.0 ** (quick_deaths - 1), 30.0) if quick_deaths else 0.0
            logger.error("worker (pid %d) exited unexpectedly with code %s after %.0fs; starting a new one%s",
                         proc.pid, code, uptime, f" in {delay:.0f}s" if delay else "")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if not self._stopping.is_set():
                    self._spawn()

    def stop(self) -> None:
        """Ask the worker to stop (it hands its running job back), then kill it after the timeout."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if self._thread.is_alive():
            self._thread.join()
        if proc is None or proc.poll() is not None:
            return
        logger.info("stopping worker (pid %d)", proc.pid)
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker (pid %d) did not stop within %.0fs; killing it", proc.pid, self._stop_timeout)
            proc.kill()
            proc.wait()
        logger.info("worker stopped")


def _up(host: str | None, port: int | None) -> int:
    """``adapterforge up``: migrate (SQLite) or check the schema, then serve the API with one worker."""
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from app.base_model import BaseModelNotFound, resolve_base_model
    from app.main import SchemaOutOfDate, check_schema, create_app
    from app.registry.migrate import upgrade

    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = _settings(**overrides)
    _check_port_free(settings.host, settings.port)  # before the worker starts and the model loads
    logging.getLogger().setLevel(settings.log_level)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    try:
        if url.startswith("sqlite"):
            upgrade(url)  # the embedded database keeps itself current
        else:
            check_schema(url)
    except SchemaOutOfDate as exc:
        logger.error("%s", exc)
        return 1
    except SQLAlchemyError as exc:
        raise _database_error(url, exc) from None
    try:
        source = resolve_base_model(settings)  # builds the demo model on first start (and says so)
    except BaseModelNotFound as exc:
        raise CliError(str(exc)) from None
    demo = "" if settings.base_model else "; the tiny demo model: set ADAPTERFORGE_BASE_MODEL to train a real one"
    logger.info("base model: %s (%s)%s", source.name, source.path, demo)

    app = create_app(settings)
    stop_requested = threading.Event()

    def note_stop(signum: int) -> None:
        if not stop_requested.is_set():
            logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()
        app.state.stopping.set()  # job event streams end now; generations get the grace period

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        note_stop(signum)
        server.should_exit = True

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app when a signal asks it to stop: uvicorn installs its own
        handlers while it serves (and re-raises the signal only once it has shut down). Its own handling
        decides how: a first Ctrl-C shuts down gracefully, a second forces the exit (setting
        ``should_exit`` before it would make the first one the second)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            note_stop(sig)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))

    # uvicorn swaps in its own handlers while serving and re-raises what it caught afterwards:
    # these handle both the re-raise and signals outside that window
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    supervisor = WorkerSupervisor(worker_command("solo", 1, settings.log_level))
    supervisor.start()
    try:
        logger.info("AdapterForge on http://%s:%d (data in %s)", settings.host, settings.port, settings.data_dir)
        server.run()
    finally:
        supervisor.stop()
    if not server.started and not stop_requested.is_set():
        logger.error("the API did not start")
        return 1
    return 0


def _worker(pool: str, concurrency: int) -> int:
    """``adapterforge worker``: replace this process with one Celery worker (signals go straight to it)."""
    command = worker_command(pool, concurrency, _settings().log_level)
    logger.info("starting worker: %s", " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def _at_least(minimum: float, kind: type[int] | type[float]) -> Any:
    """An argparse ``type``: a number of ``kind`` no smaller than ``minimum`` (argparse names the flag)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= minimum:  # (NaN too)
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterforge",
        description="Self-hosted fine-tuning service: train, register and serve PEFT adapters.",
    )
    parser.add_argument("--version", action="version", version=f"adapterforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo-model",
        help="build the tiny, seeded demo base model (and tokenizer) into a local directory",
        description="Build a tiny seeded base model locally (no download) with save_pretrained.",
    )
    demo.add_argument("directory", help="where to write the model")
    demo.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="architecture (default: llama)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    db = sub.add_parser("db", help="database schema management (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply all migrations to ADAPTERFORGE_DATABASE_URL (default: SQLite in DATA_DIR)")
    upgrade.add_argument("--url", default=None, help="database URL (overrides the settings)")
    up = sub.add_parser(
        "up",
        help="run the service on this machine: the API and one worker (SQLite, filesystem broker, local store)",
        description="Run the API and one Celery worker. Defaults are embedded: SQLite, the Celery filesystem "
        "broker and the artifact store under ADAPTERFORGE_DATA_DIR (~/.adapterforge), and a tiny demo "
        "base model unless ADAPTERFORGE_BASE_MODEL is set. The SQLite schema is migrated automatically; "
        "another database must be migrated first with `adapterforge db upgrade`. Ctrl-C stops both.",
    )
    up.add_argument("--host", default=None, help="address to bind (default: ADAPTERFORGE_HOST or 127.0.0.1)")
    up.add_argument("--port", type=_at_least(1, int), default=None, help="port to bind (default: ADAPTERFORGE_PORT or 8000)")
    worker = sub.add_parser(
        "worker",
        help="run one training worker in the foreground (production: one per GPU)",
        description="Run one Celery worker on the `gpu` queue with the ADAPTERFORGE_* settings "
        "(ADAPTERFORGE_DATABASE_URL, ADAPTERFORGE_BROKER_URL, ADAPTERFORGE_BASE_MODEL, ...). "
        "On SIGTERM a running job stops at its next step and resumes later from its last checkpoint.",
    )
    worker.add_argument("--pool", default="solo", choices=["solo", "prefork"],
                        help="Celery pool: solo (default) trains in this process and hands a running job back "
                        "on SIGTERM; prefork trains in child processes, each loading its own copy of the model, "
                        "and finishes running jobs before stopping")
    worker.add_argument("--concurrency", type=_at_least(1, int), default=1,
                        help="prefork: child processes, i.e. jobs at once (default: 1, one per GPU)")
    store = sub.add_parser("store", help="artifact store maintenance")
    store_sub = store.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)
    gc = store_sub.add_parser(
        "gc", help="delete stored objects no dataset or adapter version references (leftovers of failed commits)",
        description="Deletes artifact-store objects that no registry row (deleted ones included) references "
        "and that were not modified for --older-than seconds.",
    )
    gc.add_argument("--older-than", type=_at_least(0, float), default=3600.0,
                    help="grace period in seconds, so uploads on their way to a commit are spared (default 3600)")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    return parser


def _store_gc(older_than: float, dry_run: bool) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import Database
    from app.main import SchemaOutOfDate, check_schema
    from app.storage import LocalArtifactStore
    from app.store_gc import collect_garbage

    settings = _settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite:///") and not settings.data_dir.exists():
        raise CliError(f"no service data in {settings.data_dir} (ADAPTERFORGE_DATA_DIR): nothing to collect; "
                       "run `adapterforge up` or `adapterforge db upgrade` first")
    try:
        check_schema(url)
    except SchemaOutOfDate as exc:
        raise CliError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _database_error(url, exc) from None
    db = Database(url)
    try:
        with db.session() as session:
            report = collect_garbage(session, LocalArtifactStore(settings.store_dir), older_than=older_than,
                                     dry_run=dry_run)
    finally:
        db.dispose()
    verb = "would remove" if dry_run else "removed"
    logger.info("%s %d objects (%d bytes); %d kept", verb, report.removed, report.removed_bytes, report.kept)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapterforge`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin otherwise
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except CliError as exc:
        logger.error("%s", exc)
        return exc.code


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo-model":
        from adapters_core.tiny_models import ensure_tiny_model

        try:
            path = ensure_tiny_model(args.directory, arch=args.arch, seed=args.seed)
        except OSError as exc:
            raise CliError(f"cannot build the demo model in {args.directory}: {exc}") from None
        logger.info("demo %s model ready in %s", args.arch, path)
        return 0
    if args.command == "db":
        from sqlalchemy.exc import SQLAlchemyError

        from app.registry.migrate import current_revision, upgrade

        settings = _settings()
        url = args.url or settings.resolved_database_url
        if url.startswith("sqlite:///"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            upgrade(url)
            revision = current_revision(url)
        except SQLAlchemyError as exc:
            raise _database_error(url, exc) from None
        logger.info("database schema at revision %s", revision)
        return 0
    if args.command == "up":
        try:
            return _up(args.host, args.port)
        except KeyboardInterrupt:  # Ctrl-C while preparing, before anything was started
            return 130
    if args.command == "worker":
        return _worker(args.pool, args.concurrency)
    if args.command == "store":
        return _store_gc(args.older_than, args.dry_run)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
