"""docker-compose.yml and docker/Dockerfile.* against the code, without a Docker daemon.

Every command a container runs must resolve to code that exists (the ``adapterforge`` parser
accepts it, ``celery -A`` names a module, ``uvicorn --factory`` an importable factory), every
``ADAPTERFORGE_*`` variable must be a field of :class:`app.settings.Settings` and its value must
validate, and the wiring must hold: GPU reservation, migrate-before-start, one shared store volume,
ports, healthchecks, a persistent Redis. Each check collects concrete problems; the last test feeds
a deliberately broken stack through the same checks to show that they fail.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from app.queue import QUEUE_NAME
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCS_FILE = ROOT / "docs" / "deployment.md"
PREFIX = "ADAPTERFORGE_"
ENV_NAME = re.compile(r"\bADAPTERFORGE_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------------------------------------
# Reading Dockerfiles, .dockerignore and the compose file


def interpolate(value: str) -> str:
    """Compose variable substitution as a fresh host with no variables set sees it."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        if op in ("-", ":-"):
            return default
        if op in ("?", ":?"):
            return f"<required {name}>"
        return ""  # ${VAR}, $VAR and ${VAR:+alt} with VAR unset

    return INTERPOLATION.sub(sub, value)


def split_args(value: str) -> list[str]:
    """Exec form (JSON array) or shell form of a Dockerfile CMD/ENTRYPOINT/RUN."""
    value = value.strip()
    if value.startswith("["):
        return [str(v) for v in json.loads(value)]
    return shlex.split(value)


@dataclass
class Dockerfile:
    path: Path  # relative to ROOT
    context: Path  # absolute build context
    instructions: list[tuple[str, str]]  # every stage
    final: list[tuple[str, str]]  # the last stage (what the image runs)

    @classmethod
    def parse(cls, path: Path, context: Path) -> Dockerfile:
        lines = [ln for ln in (ROOT / path).read_text().splitlines() if not ln.lstrip().startswith("#")]
        joined: list[str] = []
        buf = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            if buf.strip():
                joined.append(buf.strip())
            buf = ""
        instructions = []
        for line in joined:
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
        final = instructions[starts[-1]:] if starts else instructions
        return cls(path, context, instructions, final)

    def last(self, keyword: str) -> str | None:
        found = [args for k, args in self.final if k == keyword]
        return found[-1] if found else None

    def argv(self) -> list[str]:
        entry, cmd = self.last("ENTRYPOINT"), self.last("CMD")
        return (split_args(entry) if entry else []) + (split_args(cmd) if cmd else [])

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for keyword, args in self.instructions:
            if keyword != "ENV":
                continue
            parts = shlex.split(args)
            if parts and "=" not in parts[0]:  # legacy `ENV KEY value`
                env[parts[0]] = " ".join(parts[1:])
                continue
            for part in parts:
                key, _, value = part.partition("=")
                env[key] = value
        return env

    def exposed_ports(self) -> set[int]:
        return {int(p.split("/")[0]) for k, args in self.final if k == "EXPOSE" for p in args.split()}

    def healthcheck(self) -> list[str] | None:
        args = self.last("HEALTHCHECK")
        if args is None or args.strip().upper() == "NONE":
            return None
        m = re.search(r"\bCMD\s+(.*)$", args)
        return split_args(m.group(1)) if m else None

    def copy_sources(self) -> list[str]:
        sources: list[str] = []
        for keyword, args in self.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            parts = split_args(args) if args.lstrip().startswith("[") else shlex.split(args)
            if any(p.startswith("--from") for p in parts):
                continue  # from another stage or image, not the build context
            parts = [p for p in parts if not p.startswith("--")]
            sources.extend(parts[:-1])
        return sources


def dockerignore_patterns(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``rel`` (relative to the context) is left out of the build context: it or a parent
    folder matches the last matching pattern, ``!`` re-including (Docker's rules, simplified)."""
    rel = rel.strip("/")
    if rel in ("", "."):
        return False
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _pattern_regex(raw[1:] if negate else raw)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    dockerfile: Dockerfile | None  # None: a third-party image (postgres, redis)

    def argv(self) -> list[str]:
        def as_list(value: Any) -> list[str]:
            if value is None:
                return []
            if isinstance(value, str):
                return shlex.split(interpolate(value))
            return [interpolate(str(v)) for v in value]

        # Compose: `entrypoint` replaces the image's ENTRYPOINT and drops its CMD.
        if "entrypoint" in self.spec:
            entry = as_list(self.spec["entrypoint"])
            return entry + as_list(self.spec.get("command"))
        image_entry = split_args(self.dockerfile.last("ENTRYPOINT") or "[]") if self.dockerfile else []
        if "command" in self.spec:
            return image_entry + as_list(self.spec["command"])
        return self.dockerfile.argv() if self.dockerfile else []

    def program(self) -> list[str]:
        """argv without a leading ``python -m``."""
        argv = self.argv()
        if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m":
            return argv[2:]
        return argv

    @property
    def role(self) -> str:
        argv = self.program()
        if not argv:
            return "none"
        if argv[0] == "uvicorn":
            return "api"
        if argv[0] == "celery" and "worker" in argv:
            return "worker"
        if argv[0] == "adapterforge" and argv[1:3] == ["db", "upgrade"]:
            return "migrate"
        if argv[0] == "adapterforge" and argv[1:2] == ["worker"]:
            return "worker"
        if argv[0] == "adapterforge" and argv[1:2] == ["up"]:
            return "api+worker"
        return "other"

    def env(self) -> dict[str, str]:
        env = dict(self.dockerfile.env()) if self.dockerfile else {}
        raw = self.spec.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.partition("=")[::2] for item in raw)
        env.update({str(k): interpolate("" if v is None else str(v)) for k, v in raw.items()})
        return env

    def mounts(self) -> list[tuple[str, str, str]]:
        """(type, source, target) of each volume entry."""
        out = []
        for entry in self.spec.get("volumes") or []:
            if isinstance(entry, dict):
                out.append((entry.get("type", "volume"), str(entry.get("source", "")), str(entry["target"])))
                continue
            parts = interpolate(entry).split(":")
            if len(parts) == 1:
                out.append(("volume", "", parts[0]))  # anonymous volume
                continue
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
            out.append((kind, source, target))
        return out

    def container_ports(self) -> set[int]:
        ports: set[int] = set()
        for entry in self.spec.get("ports") or []:
            if isinstance(entry, dict):
                ports.add(int(entry["target"]))
            else:
                ports.add(int(interpolate(str(entry)).rsplit(":", 1)[-1].split("/")[0]))
        return ports

    def depends_on(self) -> dict[str, str]:
        deps = self.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {name: (opts or {}).get("condition", "service_started") for name, opts in deps.items()}


@dataclass
class Stack:
    compose: dict[str, Any]
    text: str  # the compose file as written (comments included)
    services: dict[str, Service] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # found while loading (missing Dockerfiles)

    @classmethod
    def load(cls, compose: dict[str, Any], text: str | None = None) -> Stack:
        stack = cls(compose, text if text is not None else yaml.safe_dump(compose))
        built: dict[str, Dockerfile] = {}  # image name -> Dockerfile of a service that builds it
        pending = []
        for name, spec in (compose.get("services") or {}).items():
            build = spec.get("build")
            if build is None:
                pending.append((name, spec))
                continue
            if isinstance(build, str):
                build = {"context": build}
            context = (ROOT / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                stack.problems.append(f"service {name}: Dockerfile {dockerfile.relative_to(ROOT)} does not exist")
                stack.services[name] = Service(name, spec, None)
                continue
            parsed = Dockerfile.parse(dockerfile.relative_to(ROOT), context)
            stack.services[name] = Service(name, spec, parsed)
            if "image" in spec:
                built[spec["image"]] = parsed
        for name, spec in pending:
            stack.services[name] = Service(name, spec, built.get(spec.get("image", "")))
        return stack

    def ours(self) -> list[Service]:
        return [s for s in self.services.values() if s.dockerfile is not None]

    def with_role(self, *roles: str) -> list[Service]:
        return [s for s in self.services.values() if s.role in roles]

    def dockerfiles(self) -> dict[Path, Dockerfile]:
        return {s.dockerfile.path: s.dockerfile for s in self.ours() if s.dockerfile is not None}


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def load_stack() -> Stack:
    return Stack.load(load_compose(), COMPOSE_FILE.read_text())


# ---------------------------------------------------------------------------------------------
# Checks: each returns a list of problems, empty when all is well


def setting_name_problems(text: str, where: str) -> list[str]:
    fields = set(Settings.model_fields)
    return [
        f"{where}: {name} is not a setting (no field {name[len(PREFIX):].lower()!r} in app.settings.Settings)"
        for name in sorted(set(ENV_NAME.findall(text)))
        if name[len(PREFIX):].lower() not in fields
    ]


def _adapterforge_problems(argv: list[str], where: str) -> list[str]:
    from adapterforge.cli import _build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = _build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"{where}: `{shlex.join(argv)}` is refused by the adapterforge CLI: {err.getvalue().strip()}"]
    if args.command is None:
        return [f"{where}: `{shlex.join(argv)}` names no subcommand (it only prints the help)"]
    return []


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def celery_app_module(argv: list[str]) -> str | None:
    return _option(argv, "-A", "--app")


def module_file_exists(dotted: str) -> bool:
    base = ROOT / Path(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _celery_problems(argv: list[str], where: str) -> list[str]:
    problems = []
    app = celery_app_module(argv)
    if not app:
        problems.append(f"{where}: `{shlex.join(argv)}` has no -A/--app")
    if "worker" in argv:
        queues = (_option(argv, "-Q", "--queues") or "").split(",")
        if QUEUE_NAME not in queues:
            problems.append(f"{where}: the worker does not consume the queue the API sends to "
                            f"({QUEUE_NAME!r}, app.queue.QUEUE_NAME); -Q is {queues}")
        if _option(argv, "-c", "--concurrency") != "1" and _option(argv, "-P", "--pool") != "solo":
            problems.append(f"{where}: a GPU worker must run one job at a time (-c 1 or -P solo)")
    else:
        problems.append(f"{where}: `{shlex.join(argv)}` does not start a celery worker")
    return problems


def _uvicorn_problems(argv: list[str], where: str) -> list[str]:
    targets = [a for a in argv[1:] if ":" in a and not a.startswith("-") and re.fullmatch(r"[\w.]+:[\w.]+", a)]
    if len(targets) != 1:
        return [f"{where}: `{shlex.join(argv)}` names no single module:attribute app"]
    module_name, attr = targets[0].split(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        return [f"{where}: uvicorn app {targets[0]} cannot be imported: {exc}"]
    factory = "--factory" in argv
    if factory and not callable(obj):
        return [f"{where}: --factory given but {targets[0]} is not callable"]
    if not factory and inspect.isfunction(obj):
        return [f"{where}: {targets[0]} is a factory function; uvicorn needs --factory"]
    if factory and any(p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
                       and p.kind is not p.VAR_POSITIONAL for p in inspect.signature(obj).parameters.values()):
        return [f"{where}: {targets[0]} needs arguments, but uvicorn --factory calls it with none"]
    return []


def command_problems(argv: list[str], where: str) -> list[str]:
    if not argv:
        return [f"{where}: runs no command (no CMD/ENTRYPOINT and no compose command)"]
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m":
        if importlib.util.find_spec(argv[2].split(".")[0]) is None:
            return [f"{where}: python -m {argv[2]}: no such module"]
        argv = argv[2:]
    program = argv[0]
    if program == "adapterforge":
        return _adapterforge_problems(argv, where)
    if program == "celery":
        return _celery_problems(argv, where)
    if program == "uvicorn":
        return _uvicorn_problems(argv, where)
    return [f"{where}: `{shlex.join(argv)}` is not a command these tests know how to resolve "
            "(adapterforge, celery, uvicorn, python -m): extend tests/test_compose.py"]


def check_commands(stack: Stack) -> list[str]:
    problems = list(stack.problems)
    for df in stack.dockerfiles().values():
        problems += command_problems(df.argv(), f"{df.path} CMD")
    for svc in stack.ours():
        problems += command_problems(svc.argv(), f"service {svc.name}")
    return problems


def check_env(stack: Stack) -> list[str]:
    """Names are settings, and each service's ADAPTERFORGE_ env builds a valid Settings."""
    problems = setting_name_problems(stack.text, "docker-compose.yml")
    for df in stack.dockerfiles().values():
        problems += setting_name_problems((ROOT / df.path).read_text(), str(df.path))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    for svc in stack.ours():
        env = {k: v for k, v in svc.env().items() if k.startswith(PREFIX)}
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
            try:
                Settings()
            except Exception as exc:  # pydantic ValidationError or pydantic-settings SettingsError
                problems.append(f"service {svc.name}: its ADAPTERFORGE_ environment is not valid settings "
                                f"(as a host with no variables set sees it): {exc}")
    return problems


def check_build_context(stack: Stack) -> list[str]:
    """COPY sources exist and are not dropped by .dockerignore; what the install needs is sent."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", pyproject["project"].get("readme", "README.md"), "migrations", *packages]
    problems = []
    for df in stack.dockerfiles().values():
        patterns = dockerignore_patterns(df.context)
        for src in df.copy_sources():
            if any(ch in src for ch in "*?["):
                continue  # globs: not worth resolving here
            if not (df.context / src).exists():
                problems.append(f"{df.path}: COPY source {src!r} does not exist in the build context")
            elif dockerignored(src, patterns):
                problems.append(f"{df.path}: COPY source {src!r} is excluded by .dockerignore")
            if src in (".", "./"):
                problems += [f"{df.path}: {n} is needed in the image but excluded by .dockerignore"
                             for n in needed if dockerignored(n, patterns)]
    return problems


def check_gpu(stack: Stack) -> list[str]:
    problems = []
    workers = stack.with_role("worker")
    if not workers:
        problems.append("no service runs a worker")
    for svc in workers:
        devices = (((svc.spec.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        ok = any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
                 and (d.get("count") or d.get("device_ids")) for d in devices or [])
        if not ok:
            problems.append(f"service {svc.name}: runs a worker but reserves no GPU "
                            "(deploy.resources.reservations.devices with driver nvidia, capabilities [gpu], "
                            "count or device_ids)")
    return problems


def check_startup_order(stack: Stack) -> list[str]:
    problems = []
    migrators = stack.with_role("migrate")
    if len(migrators) != 1:
        return [f"expected one service running `adapterforge db upgrade`, found {[s.name for s in migrators]}"]
    migrate = migrators[0]
    if str(migrate.spec.get("restart", "no")) != "no":
        problems.append(f"service {migrate.name}: a one-shot migration must have restart: \"no\"")
    for svc in stack.with_role("api", "worker", "api+worker"):
        if svc.depends_on().get(migrate.name) != "service_completed_successfully":
            problems.append(f"service {svc.name}: must depend on {migrate.name} with condition "
                            "service_completed_successfully (it refuses an out-of-date schema)")
    for svc in stack.services.values():
        for dep, condition in svc.depends_on().items():
            target = stack.services.get(dep)
            if target is None:
                problems.append(f"service {svc.name}: depends on unknown service {dep}")
            elif condition == "service_healthy" and not (
                target.spec.get("healthcheck") or (target.dockerfile and target.dockerfile.healthcheck())
            ):
                problems.append(f"service {svc.name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    postgres = [n for n, s in stack.services.items() if str(s.spec.get("image", "")).startswith("postgres")]
    if not any(migrate.depends_on().get(name) == "service_healthy" for name in postgres):
        problems.append(f"service {migrate.name}: must wait for postgres {postgres} to be healthy")
    return problems


def check_volumes(stack: Stack) -> list[str]:
    declared = set(stack.compose.get("volumes") or {})
    problems = []
    for svc in stack.services.values():
        for kind, source, target in svc.mounts():
            if kind == "volume" and source and source not in declared:
                problems.append(f"service {svc.name}: volume {source!r} (at {target}) is not declared under volumes:")
    stores = {}
    for svc in stack.with_role("api", "worker", "api+worker"):
        data_dir = svc.env().get(PREFIX + "DATA_DIR")
        if not data_dir:
            problems.append(f"service {svc.name}: ADAPTERFORGE_DATA_DIR is not set (the store would be in $HOME)")
            continue
        sources = [src for kind, src, target in svc.mounts() if target.rstrip("/") == data_dir.rstrip("/") and src]
        if not sources:
            problems.append(f"service {svc.name}: nothing is mounted at its data dir {data_dir}")
        else:
            stores[svc.name] = sources[0]
    if len(set(stores.values())) > 1:
        problems.append(f"API and workers must share one store volume at their data dir; they mount {stores}")
    return problems


def _api_routes() -> set[str]:
    from app.main import create_app

    app = create_app(Settings(data_dir=Path("/nonexistent")))  # no lifespan: nothing is opened
    return set(app.openapi()["paths"]) | {str(getattr(r, "path", "")) for r in app.routes}


def check_ports(stack: Stack) -> list[str]:
    problems = []
    routes = _api_routes()
    for svc in stack.with_role("api"):
        port = int(_option(svc.program(), "--port") or 8000)
        if port not in svc.container_ports():
            problems.append(f"service {svc.name}: uvicorn listens on {port} but the published container ports "
                            f"are {sorted(svc.container_ports())}")
        df = svc.dockerfile
        if df is None:
            continue
        if port not in df.exposed_ports():
            problems.append(f"{df.path}: EXPOSE {sorted(df.exposed_ports())} does not include uvicorn's port {port}")
        check = df.healthcheck()
        if check is None and not svc.spec.get("healthcheck"):
            problems.append(f"service {svc.name}: no healthcheck")
        for url in re.findall(r"https?://[^\s'\"]+", " ".join(check or [])):
            parts = urlsplit(url)
            if (parts.port or 80) != port:
                problems.append(f"{df.path}: HEALTHCHECK probes port {parts.port} but uvicorn listens on {port}")
            if parts.path not in routes:
                problems.append(f"{df.path}: HEALTHCHECK probes {parts.path}, which is not a route of the API")
    return problems


def check_backing_services(stack: Stack) -> list[str]:
    """Database and broker URLs name services of this stack; Redis persists its queue."""
    problems = []
    for svc in stack.with_role("api", "worker", "api+worker", "migrate"):
        env = svc.env()
        for key in ("DATABASE_URL",) if svc.role == "migrate" else ("DATABASE_URL", "BROKER_URL"):
            url = env.get(PREFIX + key)
            if not url:
                problems.append(f"service {svc.name}: {PREFIX}{key} is not set (it would use the embedded default)")
                continue
            host = urlsplit(url).hostname
            if host not in stack.services:
                problems.append(f"service {svc.name}: {PREFIX}{key} points at {host!r}, not a service of this stack")
            elif host not in svc.depends_on():
                problems.append(f"service {svc.name}: uses {host} but does not depend on it")
    redis = [s for s in stack.services.values() if str(s.spec.get("image", "")).startswith("redis")]
    if not redis:
        problems.append("no redis service")
    for svc in redis:
        argv = svc.argv()
        if _option(argv, "--appendonly") != "yes":
            problems.append(f"service {svc.name}: redis without --appendonly yes loses queued jobs on restart")
        if not any(target == "/data" and kind == "volume" for kind, _, target in svc.mounts()):
            problems.append(f"service {svc.name}: /data (the append-only file) is not on a volume")
    return problems


def check_non_root(stack: Stack) -> list[str]:
    problems = []
    for df in stack.dockerfiles().values():
        user = df.last("USER")
        if user is None or user.split(":")[0] in ("root", "0"):
            problems.append(f"{df.path}: the image runs as root (no non-root USER in the final stage)")
    return problems


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def stack() -> Stack:
    return load_stack()


def _assert_none(problems: list[str]) -> None:
    assert not problems, "\n".join(["", *problems])


def test_compose_has_the_production_services(stack: Stack) -> None:
    roles = {s.name: s.role for s in stack.services.values()}
    missing = [r for r in ("migrate", "api", "worker") if r not in roles.values()]
    images = [str(s.spec.get("image", "")) for s in stack.services.values()]
    missing += [i for i in ("postgres", "redis") if not any(img.startswith(i) for img in images)]
    assert not missing, f"docker-compose.yml lacks {missing}; services and roles: {roles}"


def test_commands_resolve_to_code(stack: Stack) -> None:
    _assert_none(check_commands(stack))


def test_celery_app_module_exists(stack: Stack) -> None:
    modules = {celery_app_module(s.program()) for s in stack.with_role("worker") if s.program()[0] == "celery"}
    modules |= {celery_app_module(df.argv()) for df in stack.dockerfiles().values() if df.argv()[:1] == ["celery"]}
    missing = sorted(m for m in modules if m and not module_file_exists(m))
    if missing == ["worker.celery_app"] and not (ROOT / "worker" / "celery_app.py").exists():
        pytest.skip("worker/celery_app.py (the Celery app the worker image starts) has not landed yet")
    _assert_none([f"celery -A {m}: no module file {m.replace('.', '/')}.py" for m in missing])


def test_adapterforge_variables_are_settings(stack: Stack) -> None:
    _assert_none(check_env(stack))


def test_docs_name_only_real_settings() -> None:
    assert DOCS_FILE.exists(), "docs/deployment.md is missing"
    text = DOCS_FILE.read_text()
    assert ENV_NAME.search(text), "docs/deployment.md names no ADAPTERFORGE_ variable"
    _assert_none(setting_name_problems(text, "docs/deployment.md"))


def test_build_context_has_what_the_images_copy(stack: Stack) -> None:
    assert len(stack.dockerfiles()) >= 2, f"expected the API and worker Dockerfiles, got {list(stack.dockerfiles())}"
    _assert_none(check_build_context(stack))


def test_workers_reserve_a_gpu(stack: Stack) -> None:
    _assert_none(check_gpu(stack))


def test_schema_is_migrated_before_anything_starts(stack: Stack) -> None:
    _assert_none(check_startup_order(stack))


def test_volumes_are_declared_and_the_store_is_shared(stack: Stack) -> None:
    _assert_none(check_volumes(stack))


def test_ports_and_healthcheck_match_the_server(stack: Stack) -> None:
    _assert_none(check_ports(stack))


def test_database_broker_and_redis_persistence(stack: Stack) -> None:
    _assert_none(check_backing_services(stack))


def test_images_run_as_non_root(stack: Stack) -> None:
    _assert_none(check_non_root(stack))


def test_dockerignore_matching() -> None:
    patterns = ["**/__pycache__", "*.egg-info", "tests", "docs", "!docs/keep.md"]
    assert dockerignored("app/__pycache__/x.pyc", patterns)
    assert dockerignored("adapterforge.egg-info/PKG-INFO", patterns)
    assert dockerignored("tests/test_compose.py", patterns)
    assert not dockerignored("docs/keep.md", patterns)
    assert not dockerignored("app/main.py", patterns)
    assert not dockerignored(".", patterns)


def test_checks_fail_on_a_broken_stack() -> None:
    """The same checks on a deliberately broken copy of the stack report each breakage."""
    broken = copy.deepcopy(load_compose())
    services = broken["services"]
    migrate = next(n for n, s in Stack.load(broken).services.items() if s.role == "migrate")
    api = next(n for n, s in Stack.load(broken).services.items() if s.role == "api")
    worker = next(n for n, s in Stack.load(broken).services.items() if s.role == "worker")
    services[worker].pop("deploy", None)
    services[worker]["environment"] = {**services[worker]["environment"], "ADAPTERFORGE_NOT_A_SETTING": "1",
                                       "ADAPTERFORGE_API_KEYS": ""}
    services[worker]["volumes"] = ["undeclared:/data"]
    services[worker]["command"] = ["celery", "-A", "worker.celery_app", "worker", "-Q", "cpu", "-c", "4"]
    services[api]["depends_on"] = {migrate: {"condition": "service_started"}}
    services[api]["ports"] = ["8080:8080"]
    services[api]["command"] = ["uvicorn", "app.main:create_app", "--port", "8000"]
    services[migrate]["restart"] = "on-failure"
    services["typo"] = {"image": services[migrate]["image"], "command": ["adapterforge", "db", "upgrayde"]}
    services["extra"] = {"build": {"context": ".", "dockerfile": "docker/Dockerfile.missing"}}
    for name, svc in services.items():
        if str(svc.get("image", "")).startswith("redis"):
            services[name]["command"] = ["redis-server"]
    stack = Stack.load(broken)
    found = "\n".join(check_commands(stack) + check_env(stack) + check_gpu(stack) + check_startup_order(stack)
                      + check_volumes(stack) + check_ports(stack) + check_backing_services(stack))
    expected = [
        "Dockerfile.missing does not exist",
        "upgrayde",
        "is a factory function",
        "does not consume the queue",
        "one job at a time",
        "ADAPTERFORGE_NOT_A_SETTING is not a setting",
        "not valid settings",
        "reserves no GPU",
        "service_completed_successfully",
        'restart: "no"',
        "'undeclared'",
        "API and workers must share one store volume",
        "published container ports",
        "--appendonly yes",
    ]
    missed = [e for e in expected if e not in found]
    assert not missed, f"checks did not report {missed}; they reported:\n{found}"
