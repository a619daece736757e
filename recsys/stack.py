"""Run docker-compose.yml's app services as local processes (`recsys stack up|down|status`).

The compose file is the one description of the deployment. Where no Docker engine runs,
this starts the same `recsys <command>` with the same environment against the machine's
own Postgres, RabbitMQ and Redis: compose hostnames become 127.0.0.1 (on the published
port), volume mount points become host directories, and the caller's DATABASE_URL,
BROKER_URL, REDIS_URL, DATA_PATH and MODEL_PATH, when set, win over the compose values.
The compose directory's `.env` fills `${VAR}` as compose does; settings written in it do
not override a service's `environment:` (a container never sees that file either).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values

from shared.doctor import mask_url

PROJECT_DIR = Path(__file__).resolve().parents[1]
COMPOSE_FILE = "docker-compose.yml"
ENTRYPOINT = "recsys"  # the image's ENTRYPOINT; compose `command:` is its arguments
LOCAL_HOST = "127.0.0.1"
# The caller may point these elsewhere (a scratch database, tmp dirs); theirs win.
CALLER_WINS = ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "DATA_PATH", "MODEL_PATH")
# Which setting names which server, for the reachability check before start-up.
SERVER_SETTINGS = {"DATABASE_URL": "Postgres", "BROKER_URL": "RabbitMQ", "REDIS_URL": "Redis"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])(.*))?", re.S)

# Processes this interpreter started, kept so they can be reaped (no zombies, no
# "still running" warnings) when `down` runs in the same process as `up`.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """The stack cannot start or stop; the message names the service or server."""


# --- the compose file --------------------------------------------------------------

def compose_path(path: Path | str | None = None) -> Path:
    """The compose file: `path`, else the project checkout's, else the current directory's."""
    candidates = [Path(path)] if path else [PROJECT_DIR / COMPOSE_FILE, Path.cwd() / COMPOSE_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise StackError(f"no compose file: looked for {', '.join(map(str, candidates))}")


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR:+alt}, nested defaults, and $$ for a literal $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2:end], variables))
            i = end + 1
        elif match := _NAME.match(text, i + 1):
            out.append(variables.get(match.group(), ""))
            i = match.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for index in range(start, len(text)):
        if text.startswith("${", index):
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise StackError(f"unclosed '${{' in compose value {text!r}")


def _expand(body: str, variables: Mapping[str, str]) -> str:
    match = _BRACED.fullmatch(body)
    if not match:
        raise StackError(f"invalid interpolation '${{{body}}}' in the compose file")
    name, operator, argument = match.groups()
    value = variables.get(name)
    if operator is None:
        return value or ""
    present = bool(value) if operator.startswith(":") else value is not None
    kind = operator[-1]
    if kind == "-":
        return value if present and value is not None else interpolate(argument, variables)
    if kind == "+":
        return interpolate(argument, variables) if present else ""
    if not present:
        detail = interpolate(argument, variables)
        raise StackError(f"{name} is required by the compose file: {detail}")
    return value or ""


def interpolated_names(path: Path | str | None = None) -> set[str]:
    """Every variable name the compose file's values interpolate (comments and `$$`
    literals aside), defaults and nested defaults included."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            names.update(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", node.replace("$$", "")))
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(_load(compose_path(path)))
    return names


def _load(file: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise StackError(f"{file} is not valid YAML: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise StackError(f"{file} has no `services:` mapping")
    return document


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def compose_variables(path: Path | str | None = None,
                      env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What compose interpolates from: the compose directory's `.env`, then the environment."""
    dotenv = compose_path(path).parent / ".env"
    values = {k: v or "" for k, v in dotenv_values(dotenv).items()} if dotenv.is_file() else {}
    values.update(os.environ if env is None else env)
    return values


def compose_services(path: Path | str | None = None,
                     env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The compose file's services, anchors merged and `${VAR}` values interpolated."""
    file = compose_path(path)
    services = _interpolate_tree(_load(file)["services"], compose_variables(file, env))
    return {name: spec or {} for name, spec in services.items()}


def app_services(path: Path | str | None = None, env: Mapping[str, str] | None = None,
                 services: Mapping[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Services run from the project image (built here), as opposed to postgres & co."""
    services = compose_services(path, env) if services is None else services
    built = {spec.get("image") for spec in services.values() if "build" in spec}
    return {name: spec for name, spec in services.items()
            if "build" in spec or (spec.get("image") and spec.get("image") in built)}


def service_command(spec: Mapping[str, Any]) -> list[str]:
    """A service's `command:` as an argument list (after the `recsys` entrypoint)."""
    command = spec.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def is_one_shot(spec: Mapping[str, Any]) -> bool:
    """One-shot services say `restart: "no"` (YAML's bare `no` is False, so both count)."""
    return "restart" in spec and str(spec["restart"]).lower() in {"no", "false"}


def depends_on(spec: Mapping[str, Any]) -> dict[str, str]:
    """Dependencies as {service: condition}, from either compose syntax."""
    raw = spec.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in raw.items()}


def environment_of(spec: Mapping[str, Any], caller: Mapping[str, str]) -> dict[str, str]:
    """A service's `environment:` as a dict; a bare name takes the caller's value."""
    raw = spec.get("environment") or {}
    if isinstance(raw, list):  # ["KEY=value", "BARE"] form
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    result: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            if key in caller:
                result[key] = caller[key]
        else:
            result[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return result


# --- making compose values local ---------------------------------------------------

def port_entries(spec: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(container port, host port, host address or None) of each entry of a service's
    `ports:` (short or long syntax), protocols dropped."""
    entries = []
    for entry in spec.get("ports") or []:
        if isinstance(entry, dict):
            target = entry.get("target", "")
            published, address = entry.get("published", target), entry.get("host_ip")
        else:
            parts = str(entry).split(":")
            target = parts[-1]
            published = parts[-2] if len(parts) > 1 else target
            address = parts[-3] if len(parts) > 2 else None
        entries.append((str(target).split("/")[0], str(published).split("/")[0],
                        None if address is None else str(address)))
    return entries


def published_ports(spec: Mapping[str, Any]) -> dict[int, int]:
    """{container port: host port} from a service's `ports:`."""
    return {int(target): int(published) for target, published, _ in port_entries(spec)
            if target.isdigit() and published.isdigit()}


def published_addresses(spec: Mapping[str, Any]) -> dict[int, str]:
    """{container port: host address} of the `ports:` entries that name one (127.0.0.1)."""
    return {int(target): address for target, _, address in port_entries(spec)
            if target.isdigit() and address}


def local_command(spec: Mapping[str, Any]) -> list[str]:
    """A service's command as a local process runs it: `--port <container port>` becomes
    the port compose publishes it on (SERVE_PORT, DASHBOARD_PORT), and `--host` the
    address it publishes on, loopback unless compose says otherwise. In a container
    0.0.0.0 reaches only the compose network; on this machine it would be every interface."""
    argv = service_command(spec)
    if "--port" not in argv[:-1] or not argv[argv.index("--port") + 1].isdigit():
        return argv
    at = argv.index("--port") + 1
    target = int(argv[at])
    published = published_ports(spec)
    if target not in published:
        return argv
    argv[at] = str(published[target])
    if "--host" in argv[:-1]:
        argv[argv.index("--host") + 1] = published_addresses(spec).get(target, LOCAL_HOST)
    return argv


def local_hosts(services: Mapping[str, dict[str, Any]],
                apps: Iterable[str]) -> dict[str, dict[int, int]]:
    """Hostname -> port map of the servers compose runs and the machine provides here."""
    apps = set(apps)
    hosts: dict[str, dict[int, int]] = {}
    for name, spec in services.items():
        if name not in apps:
            ports = published_ports(spec)
            hosts[name] = ports
            if spec.get("hostname"):
                hosts[str(spec["hostname"])] = ports
    return hosts


def local_mounts(spec: Mapping[str, Any], compose_dir: Path) -> list[tuple[str, Path]]:
    """(container path, host directory) per volume: a bind mount's source, or for a
    named volume the directory of that name beside the compose file (./data, ./models)."""
    mounts: list[tuple[str, Path]] = []
    for entry in spec.get("volumes") or []:
        if isinstance(entry, dict):
            source, target = str(entry.get("source", "")), str(entry.get("target", ""))
        else:
            source, _, rest = str(entry).partition(":")
            target = rest.split(":")[0]
        if not source or not target:
            continue
        host = Path(source).expanduser()
        mounts.append((target.rstrip("/") or "/", (compose_dir / host).resolve()))
    return sorted(mounts, key=lambda mount: len(mount[0]), reverse=True)


def localize(value: str, hosts: Mapping[str, Mapping[int, int]],
             mounts: Iterable[tuple[str, Path]]) -> str:
    """A compose value as seen from this machine: URL hosts and mount paths rewritten."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.hostname not in hosts:
            return value
        userinfo, _, _ = parts.netloc.rpartition("@")
        port = parts.port
        netloc = (f"{userinfo}@" if userinfo else "") + LOCAL_HOST
        if port is not None:
            netloc += f":{hosts[parts.hostname].get(port, port)}"
        return value.replace(f"{parts.scheme}://{parts.netloc}", f"{parts.scheme}://{netloc}", 1)
    for target, host in mounts:
        if value == target or value.startswith(target + "/"):
            return str(host) + value[len(target):]
    return value


def local_environment(spec: Mapping[str, Any], caller: Mapping[str, str],
                      hosts: Mapping[str, Mapping[int, int]], compose_dir: Path) -> dict[str, str]:
    """The environment a local process gets: the caller's, overlaid with the service's
    localized compose environment, with the caller's CALLER_WINS values on top."""
    mounts = local_mounts(spec, compose_dir)
    compose_env = {key: localize(value, hosts, mounts)
                   for key, value in environment_of(spec, caller).items()}
    env = {**caller, **compose_env}
    env.update({key: caller[key] for key in CALLER_WINS if caller.get(key)})
    return env


def start_order(apps: Mapping[str, dict[str, Any]], wanted: Iterable[str]) -> list[str]:
    """The wanted app services and their app dependencies, dependencies first; among
    services ready at the same time, one-shots go first (they gate the others)."""
    needed: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name in apps and name not in needed:
            needed.add(name)
            stack.extend(depends_on(apps[name]))
    order: list[str] = []
    pending = sorted(needed, key=lambda n: (not is_one_shot(apps[n]), n))
    while pending:
        ready = [n for n in pending if all(d in order or d not in needed
                                           for d in depends_on(apps[n]))]
        if not ready:
            raise StackError(f"dependency cycle among services {', '.join(pending)}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


# --- servers -------------------------------------------------------------------------

def _check_server(setting: str, url: str, timeout: float) -> None:
    if setting == "DATABASE_URL":
        from sqlalchemy import create_engine, pool, text

        engine = create_engine(url, poolclass=pool.NullPool,
                               connect_args={"connect_timeout": max(1, int(timeout))})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    elif setting == "BROKER_URL":
        import kombu

        with kombu.Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         timeout=timeout)
    else:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()


def check_servers(envs: Iterable[Mapping[str, str]], timeout: float = 3.0) -> None:
    """Connect to every Postgres, RabbitMQ and Redis the environments name; raise a
    StackError naming each one that is not reachable (SQLite needs no server)."""
    targets: dict[tuple[str, str], None] = {}
    for env in envs:
        for setting in SERVER_SETTINGS:
            url = env.get(setting, "").strip()
            if url and not url.startswith("sqlite"):
                targets[(setting, url)] = None
    problems = []
    for setting, url in targets:
        try:
            _check_server(setting, url, timeout)
        except Exception as error:  # any failure means "not usable"; the message says why
            reason = " ".join(str(getattr(error, "orig", None) or error).split()) or repr(error)
            problems.append(f"{SERVER_SETTINGS[setting]} ({setting}={mask_url(url)}) is not "
                            f"reachable: {reason}")
    if problems:
        raise StackError("cannot start the stack: " + "; ".join(problems))


# --- processes -------------------------------------------------------------------------

def recsys_executable() -> str:
    """The `recsys` script of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / ENTRYPOINT
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(ENTRYPOINT)
    if not found:
        raise StackError(f"no `{ENTRYPOINT}` executable beside {sys.executable} or on PATH; "
                         "install the project (pip install -e .)")
    return found


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """DATA_PATH/stack: the caller's DATA_PATH, else the setting (which reads `.env`)."""
    env = os.environ if env is None else env
    if env.get("DATA_PATH"):
        return (Path(env["DATA_PATH"]) / "stack").resolve()
    from shared.settings import get_settings

    return (get_settings().data_path / "stack").resolve()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in ticks) from /proc, or None where there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie, and not a reused pid when start_ticks is known)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, _, ticks = stat
    return state not in {"Z", "X"} and (start_ticks is None or ticks == start_ticks)


def group_alive(pgid: int) -> bool:
    """Whether any live process remains in the process group (Celery pool children too)."""
    _reap(pgid)
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            if stat[1] == pgid and stat[0] not in {"Z", "X"}:
                return True
    return False


def _record_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def _write_record(state_dir: Path, record: dict[str, Any]) -> None:
    _record_path(state_dir, record["name"]).write_text(json.dumps(record, indent=2) + "\n")


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(name: str, argv: list[str], env: Mapping[str, str], state_dir: Path,
           one_shot: bool) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    log = state_dir / f"{name}.log"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with log.open("ab") as handle:
        handle.write(f"=== {now} {shlex.join([ENTRYPOINT, *argv[1:]])}\n".encode())
        handle.flush()
        # A session of its own: `down` signals the whole group, Celery's pool included,
        # and a Ctrl-C in the caller's terminal does not reach the workers.
        process = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    _CHILDREN[process.pid] = process
    stat = _proc_stat(process.pid)
    record: dict[str, Any] = {
        "name": name, "pid": process.pid, "command": shlex.join([ENTRYPOINT, *argv[1:]]),
        "log": str(log), "one_shot": one_shot, "started_at": now,
        "start_ticks": stat[2] if stat else None, "exit_code": None,
    }
    return process, record


def _status_of(record: dict[str, Any]) -> dict[str, Any]:
    running = record.get("exit_code") is None and pid_alive(record["pid"],
                                                             record.get("start_ticks"))
    if running:
        state = "running"
    elif record.get("exit_code") is not None:
        state = "completed" if record["exit_code"] == 0 else f"failed ({record['exit_code']})"
    else:
        state = "stopped" if record.get("stopped_at") else "exited"
    return {"name": record["name"], "pid": record["pid"], "running": running, "state": state,
            "command": record["command"], "log": record["log"],
            "one_shot": record.get("one_shot", False), "started_at": record.get("started_at"),
            "exit_code": record.get("exit_code")}


def _stop_started(started: list[tuple[subprocess.Popen[bytes], dict[str, Any]]],
                  timeout: float = 10.0) -> None:
    """SIGTERM to each service's process group, SIGKILL to what is left after `timeout`."""
    for process, _record in started:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process, record in started:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _CHILDREN.pop(process.pid, None)
        record["stopped_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        _write_record(Path(record["log"]).parent, record)


def up(services: list[str] | None = None, state_dir: Path | None = None,
       env: dict[str, str] | None = None, *, compose_file: Path | None = None,
       one_shot_timeout: float = 600.0, settle: float = 2.0,
       without: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Start the app services (all, or these and their dependencies) as local processes:
    one-shots run to completion in dependency order, the rest start detached. `without`
    leaves services out of "all" (a caller that runs the pipeline itself skips bootstrap)."""
    caller = {**os.environ, **(env or {})}
    file = compose_path(compose_file)
    all_services = compose_services(file, caller)
    apps = app_services(services=all_services)
    wanted = list(services or [name for name in apps if name not in without])
    unknown = [name for name in wanted if name not in all_services]
    if unknown:
        raise StackError(f"no service {', '.join(unknown)} in {file}; services are "
                         f"{', '.join(all_services)}")
    order = start_order(apps, wanted)  # postgres & co. are the machine's own: not started
    hosts = local_hosts(all_services, apps)
    envs = {name: local_environment(apps[name], caller, hosts, file.parent) for name in order}
    check_servers(envs.values())

    state = Path(state_dir).resolve() if state_dir else default_state_dir(caller)
    state.mkdir(parents=True, exist_ok=True)
    executable = recsys_executable()
    current = {row["name"]: row for row in status(state)}
    results: list[dict[str, Any]] = []
    started: list[tuple[subprocess.Popen[bytes], dict[str, Any]]] = []
    try:
        for name in order:
            spec, argv = apps[name], [executable, *local_command(apps[name])]
            if not is_one_shot(spec) and current.get(name, {}).get("running"):
                results.append({**current[name], "state": "already running"})
                continue
            process, record = _spawn(name, argv, envs[name], state, is_one_shot(spec))
            if not is_one_shot(spec):
                _write_record(state, record)
                (state / f"{name}.pid").write_text(f"{process.pid}\n")
                started.append((process, record))
                continue
            try:
                record["exit_code"] = process.wait(timeout=one_shot_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                record["exit_code"] = process.wait()
                _write_record(state, record)
                raise StackError(f"one-shot service {name} ({record['command']}) did not finish in "
                                 f"{one_shot_timeout:g} s; log {record['log']}") from None
            finally:
                _CHILDREN.pop(process.pid, None)
            _write_record(state, record)
            if record["exit_code"] != 0:
                raise StackError(f"one-shot service {name} ({record['command']}) failed with exit "
                                 f"code {record['exit_code']}; services after it were not started. "
                                 f"Log {record['log']}:\n{_log_tail(Path(record['log']))}")
            results.append(_status_of(record))

        # A worker with a bad setting or an unreachable server exits within moments.
        deadline = time.monotonic() + settle
        while started and time.monotonic() < deadline:
            time.sleep(0.1)
            for process, record in started:
                if process.poll() is not None:
                    _CHILDREN.pop(process.pid, None)
                    raise StackError(f"service {record['name']} ({record['command']}) exited with "
                                     f"code {process.returncode} right after starting. Log "
                                     f"{record['log']}:\n{_log_tail(Path(record['log']))}")
    except StackError:
        # What this call started would otherwise run on with nobody to stop it.
        _stop_started(started)
        raise
    results.extend({**_status_of(record), "state": "started"} for _, record in started)
    return results


def status(state_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every service `up` started from this state directory, and whether it still runs."""
    state = Path(state_dir).resolve() if state_dir else default_state_dir()
    if not state.is_dir():
        return []
    records = []
    for path in state.glob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise StackError(f"unreadable stack record {path}: {error}") from None
    records.sort(key=lambda r: (r.get("started_at") or "", not r.get("one_shot"), r["name"]))
    return [_status_of(record) for record in records]


def down(state_dir: Path | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Stop every running service: SIGTERM to its process group (Celery's warm shutdown),
    SIGKILL to what is left after `timeout` seconds."""
    state = Path(state_dir).resolve() if state_dir else default_state_dir()
    running = [row for row in status(state) if row["running"]]
    for row in running:
        try:
            os.killpg(row["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(group_alive(row["pid"]) for row in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    results = []
    for row in running:
        how = "SIGTERM"
        if group_alive(row["pid"]):
            how = "SIGKILL"
            try:
                os.killpg(row["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            kill_deadline = time.monotonic() + 5.0
            while group_alive(row["pid"]) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
        record = json.loads(_record_path(state, row["name"]).read_text())
        record["stopped_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        _write_record(state, record)
        (state / f"{row['name']}.pid").unlink(missing_ok=True)
        results.append({"name": row["name"], "pid": row["pid"], "stopped_by": how,
                        "running": group_alive(row["pid"])})
    return results
