"""Start and stop a real OpenStack (Keystone, Placement, Glance, Nova) on 127.0.0.1 for the tests.

    peer.py start <state-dir>   # prints <state-dir>/peer.json once a server could be scheduled
    peer.py stop <state-dir>    # ends the processes it started and drops its databases

Each run gets its own PostgreSQL databases, RabbitMQ vhost, ports and compute host name, so two
runs on one machine never see each other's data or messages. Nova runs as its standard separate
services with the fake virt driver; networking is `fake_network.py` (see its docstring). All that
a run created is recorded in <state-dir>/state.json, which `stop` reads; logs stay in
<state-dir>/logs. The packages come from peers/openstack/setup.sh. Runs with the OpenStack venv's
python (re-executes itself there when started with another one).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENVS = Path(os.environ.get("GOVBROKER_OPENSTACK_VENVS", ROOT / ".peers" / "openstack"))
NOVA_VENV, GLANCE_VENV = VENVS / "nova", VENVS / "glance"

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
RABBIT = "127.0.0.1:5672"
REGION = "RegionOne"
START_TIMEOUT_S = float(os.environ.get("GOVBROKER_OPENSTACK_START_TIMEOUT", "300"))
DATABASES = ("keystone", "placement", "nova_api", "nova_cell0", "nova_cell1")
SERVICE_USERS = ("nova", "placement", "glance")
FLAVORS = (  # name, vcpu, memory_mb, root disk GB
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 10),
    ("m1.medium", 2, 4096, 20),
)
IMAGES = ("cirros-0.6-tiny", "kylin-v10-tiny")


class PeerError(Exception):
    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


# --- small helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# set-up commands still running, so a failed start can end them too
SETUP_COMMANDS: set[subprocess.Popen[bytes]] = set()


def run(cmd: list[str], log: Path) -> None:
    """Run one set-up command, appending its output to `log`; raise with the log on failure."""
    began = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(  # noqa: S603 - fixed commands from the venvs
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        SETUP_COMMANDS.add(proc)
        try:
            returncode = proc.wait()
        finally:
            SETUP_COMMANDS.discard(proc)
        out.write(f"(exit {returncode} after {time.monotonic() - began:.1f} s)\n")
    if returncode != 0:
        raise PeerError(f"{Path(cmd[0]).name} {' '.join(cmd[3:5])} failed", log)


def end_setup_commands() -> None:
    for proc in list(SETUP_COMMANDS):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def wait_http(url: str, deadline: float, log: Path, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait until `url` answers at all (any status below 500)."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"{url} exited with {proc.returncode} before answering", log)
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own 127.0.0.1 URL
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise PeerError(f"{url} did not answer in time", log)


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a process: with the pid it names one process, never a reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def write_key_repositories(data: Path) -> None:
    """What keystone-manage fernet_setup and credential_setup write, without two slow starts of
    keystone-manage: a staged key (0) and a primary key (1), each 32 random bytes, base64url."""
    for repo in ("fernet-keys", "credential-keys"):
        path = data / repo
        path.chmod(0o700)
        for index in (0, 1):
            key = path / str(index)
            key.write_bytes(base64.urlsafe_b64encode(secrets.token_bytes(32)))
            key.chmod(0o600)


def write_ini(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for name, options in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in options.items()]
        lines.append("")
    path.write_text("\n".join(lines))


class State:
    """What a run created, saved after every change so `stop` can undo a half-started run."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        self.data: dict[str, Any] = {"databases": [], "vhost": None, "processes": {}}
        self.lock = threading.Lock()

    def load(self) -> bool:
        if not self.path.exists():
            return False
        self.data = json.loads(self.path.read_text())
        return True

    def update(self, fn: Callable[[dict[str, Any]], None]) -> None:
        with self.lock:
            fn(self.data)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2))
            tmp.replace(self.path)


# --- PostgreSQL and RabbitMQ ----------------------------------------------------------------------


@contextlib.contextmanager
def pg() -> Iterator[Any]:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    conn.autocommit = True
    try:
        yield conn.cursor()
    finally:
        conn.close()


def db_url(name: str) -> str:
    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"


def create_databases(state: State, run_id: str) -> dict[str, str]:
    names = {db: f"gbos_{run_id}_{db}" for db in DATABASES}
    with pg() as cur:
        for name in names.values():
            # recorded first: a half-made database is still dropped by stop
            state.update(lambda d, n=name: d["databases"].append(n))  # type: ignore[misc]
            cur.execute(f'CREATE DATABASE "{name}"')
    return names


def drop_databases(names: list[str]) -> list[str]:
    problems = []
    with pg() as cur:
        for name in names:
            try:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # keep dropping the others
                problems.append(f"drop {name}: {exc}")
    return problems


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise FileNotFoundError("rabbitmqctl")
    return subprocess.run(  # noqa: S603
        [exe, "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )


def transport_url(vhost: str) -> str:
    return f"rabbit://guest:guest@{RABBIT}/{vhost}"


def create_vhost(state: State, run_id: str, log: Path) -> str:
    """A vhost of its own per run; without rabbitmqctl, share '/' and purge Nova's queues."""
    vhost = f"gbos_{run_id}"
    try:
        state.update(lambda d: d.update(vhost=vhost))
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost
    except (FileNotFoundError, subprocess.SubprocessError) as exc:
        state.update(lambda d: d.update(vhost=None))
        with log.open("a") as out:
            out.write(f"rabbitmqctl unusable ({exc}); purging queues on vhost '/'\n")
        purge_queues(log)
        return ""


def purge_queues(log: Path) -> None:
    import kombu

    with kombu.Connection(f"amqp://guest:guest@{RABBIT}//", connect_timeout=5) as conn:
        for queue in ("conductor", "scheduler", "compute"):
            try:
                with conn.channel() as channel:
                    channel.queue_purge(queue)
            except Exception as exc:  # a queue that does not exist yet is fine
                with log.open("a") as out:
                    out.write(f"purge {queue}: {exc}\n")


# --- processes ------------------------------------------------------------------------------------


class Processes:
    def __init__(self, state: State, logs: Path) -> None:
        self.state, self.logs = state, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        # a session of its own: the process and any workers it forks share one process group
        # that `stop` can end without touching anything else
        proc = subprocess.Popen(  # noqa: S603
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        started = proc_start_time(proc.pid)
        self.state.update(
            lambda d: d["processes"].update({name: {"pid": proc.pid, "start_time": started}})
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise PeerError(f"{name} exited with {proc.returncode}", self.logs / f"{name}.log")


def end_processes(processes: dict[str, dict[str, Any]], grace_s: float = 5) -> None:
    """SIGTERM each recorded process group, then SIGKILL what is left after the grace period.

    A group is ours when its leader is the process we started (same pid and start time) or
    when the leader is gone: Linux never hands out a pid while a group of that id still has
    members, so surviving members (gunicorn workers, say) can only be our leader's."""
    ours = {
        name: p["pid"]
        for name, p in processes.items()
        if proc_start_time(p["pid"]) in (p.get("start_time"), None)
    }
    for pid in ours.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = [pid for pid in ours.values() if _group_alive(pid)]
        if not alive:
            return
        time.sleep(0.2)
    for pid in ours.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap it when it is our own child
    return True


# --- configuration --------------------------------------------------------------------------------


class Layout:
    def __init__(self, state_dir: Path, run_id: str) -> None:
        self.dir = state_dir
        self.run_id = run_id
        self.logs = state_dir / "logs"
        self.etc = state_dir / "etc"
        self.data = state_dir / "data"
        self.password = secrets.token_urlsafe(16)
        self.service_password = secrets.token_urlsafe(16)
        self.host = f"gbpeer-{run_id}"
        self.ports = {
            name: free_port() for name in ("keystone", "placement", "glance", "network", "nova")
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def auth_url(self) -> str:
        return self.url("keystone") + "/v3"


def service_auth(layout: Layout, username: str) -> dict[str, Any]:
    return {
        "auth_type": "password",
        "auth_url": layout.auth_url,
        "project_name": "service",
        "project_domain_name": "Default",
        "user_domain_name": "Default",
        "username": username,
        "password": layout.service_password,
        "region_name": REGION,
    }


def authtoken(layout: Layout, username: str) -> dict[str, Any]:
    return {
        "www_authenticate_uri": layout.auth_url,
        **service_auth(layout, username),
        "service_token_roles_required": "true",
        "memcached_servers": "",
    }


def small_pool(url: str) -> dict[str, Any]:
    # many processes share the local PostgreSQL's 100 connections with the rest of the test run
    return {"connection": url, "max_pool_size": 2, "max_overflow": 6, "pool_timeout": 60}


def write_configs(layout: Layout, dbs: dict[str, str], vhost: str) -> None:
    etc, data = layout.etc, layout.data
    for sub in ("keystone", "placement", "glance", "nova"):
        (etc / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("fernet-keys", "credential-keys", "images", "staging", "tasks", "nova", "locks"):
        (data / sub).mkdir(parents=True, exist_ok=True)

    write_ini(
        etc / "keystone" / "keystone.conf",
        {
            "DEFAULT": {"use_stderr": "true"},
            "database": small_pool(db_url(dbs["keystone"])),
            "token": {"provider": "fernet"},
            "fernet_tokens": {"key_repository": data / "fernet-keys"},
            # receipts (multi-factor auth) default to /etc/keystone/fernet-keys, which bootstrap
            # checks for: point them at the peer's own keys so nothing outside it is needed
            "fernet_receipts": {"key_repository": data / "fernet-keys"},
            "credential": {"key_repository": data / "credential-keys"},
            # one process (threads) with an in-memory cache: token validation, which every
            # API call of every service needs, stays fast and never sees a stale entry
            "cache": {"enabled": "true", "backend": "dogpile.cache.memory"},
            # the cheapest bcrypt: passwords here are random and live for one test run
            "identity": {"password_hash_rounds": 4},
        },
    )
    write_ini(
        etc / "placement" / "placement.conf",
        {
            "DEFAULT": {"use_stderr": "true"},
            "placement_database": small_pool(db_url(dbs["placement"])),
            "api": {"auth_strategy": "keystone"},
            "keystone_authtoken": authtoken(layout, "placement"),
        },
    )

    shutil.copy(GLANCE_VENV / "etc/glance/glance-api-paste.ini", etc / "glance")
    write_ini(
        etc / "glance" / "glance-api.conf",
        {
            "DEFAULT": {"use_stderr": "true", "enabled_backends": "fs:file"},
            "database": {"connection": f"sqlite:///{data / 'glance.sqlite'}"},
            "glance_store": {"default_backend": "fs"},
            "fs": {"filesystem_store_datadir": data / "images"},
            "os_glance_staging_store": {"filesystem_store_datadir": data / "staging"},
            "os_glance_tasks_store": {"filesystem_store_datadir": data / "tasks"},
            "keystone_authtoken": authtoken(layout, "glance"),
            "paste_deploy": {
                "flavor": "keystone",
                "config_file": etc / "glance" / "glance-api-paste.ini",
            },
            "oslo_concurrency": {"lock_path": data / "locks"},
        },
    )

    transport = transport_url(vhost)
    common: dict[str, dict[str, Any]] = {
        "DEFAULT": {
            "transport_url": transport,
            "host": layout.host,
            "my_ip": "127.0.0.1",
            "state_path": data / "nova",
            "use_stderr": "true",
            # a one-host cloud can only resize in place
            "allow_resize_to_same_host": "true",
            # periodic tasks (the scheduler's host discovery among them) start at once, not up
            # to a minute later
            "periodic_fuzzy_delay": 0,
        },
        "oslo_concurrency": {"lock_path": data / "locks"},
        "oslo_messaging_notifications": {"driver": "noop"},
        "placement": service_auth(layout, "nova"),
        "neutron": service_auth(layout, "nova"),
        "glance": {"region_name": REGION},
        "service_user": {"send_service_user_token": "true", **service_auth(layout, "nova")},
        "os_vif_ovs": {"ovsdb_connection": ""},
    }
    shutil.copy(NOVA_VENV / "etc/nova/api-paste.ini", etc / "nova")
    controller = {
        **common,
        "api": {"auth_strategy": "keystone"},
        "api_database": small_pool(db_url(dbs["nova_api"])),
        "database": small_pool(db_url(dbs["nova_cell1"])),
        "keystone_authtoken": authtoken(layout, "nova"),
        "wsgi": {"api_paste_config": etc / "nova" / "api-paste.ini"},
        "conductor": {"workers": 1},
        # picks up the compute host's cell mapping without a manual discover_hosts
        "scheduler": {"workers": 1, "discover_hosts_in_cells_interval": 2},
        # the tests set their own per-project limits when they want Nova's refusal
        "quota": {"instances": -1, "cores": -1, "ram": -1},
    }
    write_ini(etc / "nova" / "nova.conf", controller)
    compute = {
        **common,
        "DEFAULT": {**common["DEFAULT"], "compute_driver": "fake.FakeDriver"},
    }
    write_ini(etc / "nova" / "nova-compute.conf", compute)


# --- start ----------------------------------------------------------------------------------------


def bin_(venv: Path, name: str) -> str:
    return str(venv / "bin" / name)


def sdk_connect(layout: Layout) -> Any:
    import openstack

    return openstack.connect(
        auth_url=layout.auth_url,
        username="admin",
        password=layout.password,
        project_name="admin",
        user_domain_name="Default",
        project_domain_name="Default",
        region_name=REGION,
        api_timeout=60,
        load_yaml_config=False,
        load_envvars=False,
    )


def register_catalog(layout: Layout) -> None:
    """Service users and the catalog; Keystone's bootstrap made admin and the identity service."""
    conn = sdk_connect(layout)
    identity = conn.identity
    service_project = identity.create_project(name="service", domain_id="default")
    admin = identity.find_role("admin", ignore_missing=False)
    try:
        service_role = identity.find_role("service", ignore_missing=False)
    except Exception:  # older bootstraps do not make it
        service_role = identity.create_role(name="service")
    for username in SERVICE_USERS:
        user = identity.create_user(
            name=username, password=layout.service_password, domain_id="default"
        )
        for role in (admin, service_role):
            identity.assign_project_role_to_user(service_project, user, role)
    for name, kind, url in (
        ("placement", "placement", layout.url("placement")),
        ("nova", "compute", layout.url("nova") + "/v2.1"),
        ("glance", "image", layout.url("glance")),
        ("neutron", "network", layout.url("network")),
    ):
        service = identity.create_service(name=name, type=kind)
        for interface in ("public", "internal"):
            identity.create_endpoint(
                service_id=service.id, interface=interface, url=url, region_id=REGION
            )
    conn.close()


class Launch:
    """One start: set-up steps in parallel threads, then the services in dependency order."""

    def __init__(self, state_dir: Path) -> None:
        self.began = time.monotonic()
        self.deadline = self.began + START_TIMEOUT_S
        self.run_id = secrets.token_hex(4)
        self.layout = Layout(state_dir, self.run_id)
        self.layout.logs.mkdir(parents=True)
        self.state = State(state_dir)
        self.state.update(lambda d: d.update(run_id=self.run_id))
        self.procs = Processes(self.state, self.layout.logs)
        self.setup_log = self.layout.logs / "setup.log"
        self.done: dict[str, threading.Event] = {}
        self.errors: list[BaseException] = []
        self.dbs: dict[str, str] = {}
        self.vhost = ""

    def mark(self, what: str) -> None:
        with self.setup_log.open("a") as out:
            out.write(f"{time.monotonic() - self.began:6.1f} s  {what}\n")

    def conf(self, *parts: str) -> str:
        return str(self.layout.etc.joinpath(*parts))

    # -- set-up commands, one thread per service --

    def keystone_setup(self) -> None:
        log = self.layout.logs / "keystone-setup.log"
        manage = [
            bin_(NOVA_VENV, "keystone-manage"),
            "--config-file",
            self.conf("keystone", "keystone.conf"),
        ]
        run([*manage, "db_sync"], log)
        write_key_repositories(self.layout.data)
        url = self.layout.auth_url + "/"
        run(
            [*manage, "bootstrap", "--bootstrap-password", self.layout.password,
             "--bootstrap-public-url", url, "--bootstrap-internal-url", url,
             "--bootstrap-region-id", REGION],
            log,
        )  # fmt: skip

    def nova_setup(self) -> None:
        log = self.layout.logs / "nova-setup.log"
        manage = [bin_(NOVA_VENV, "nova-manage"), "--config-file", self.conf("nova", "nova.conf")]
        run([*manage, "api_db", "sync"], log)
        cell0 = db_url(self.dbs["nova_cell0"])
        run([*manage, "cell_v2", "map_cell0", "--database_connection", cell0], log)
        run(
            [*manage, "cell_v2", "create_cell", "--name", "cell1",
             "--database_connection", db_url(self.dbs["nova_cell1"]),
             "--transport-url", transport_url(self.vhost)],
            log,
        )  # fmt: skip
        run([*manage, "db", "sync"], log)

    def placement_setup(self) -> None:
        conf = self.conf("placement", "placement.conf")
        manage = [bin_(NOVA_VENV, "placement-manage"), "--config-file", conf]
        run([*manage, "db", "sync"], self.layout.logs / "placement-setup.log")

    def glance_setup(self) -> None:
        manage = [bin_(GLANCE_VENV, "glance-manage"), "--config-dir", self.conf("glance")]
        run([*manage, "db_sync"], self.layout.logs / "glance-setup.log")

    def start_setup(self, steps: dict[str, Callable[[], None]]) -> None:
        def runner(name: str, step: Callable[[], None]) -> None:
            try:
                step()
                self.done[name].set()
            except BaseException as exc:
                self.errors.append(exc)

        for name, step in steps.items():
            self.done[name] = threading.Event()
            threading.Thread(target=runner, args=(name, step), daemon=True).start()

    def wait_setup(self, name: str) -> None:
        while not self.done[name].wait(0.2):
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > self.deadline:
                log = self.layout.logs / f"{name}-setup.log"
                raise PeerError(f"set-up step {name} took too long", log)
        self.mark(f"{name} set up")

    # -- services --

    def spawn_wsgi(
        self, name: str, venv: Path, module: str, config_env: dict[str, str], **sizes: int
    ) -> None:
        cmd = [
            bin_(venv, "gunicorn"),
            f"--bind=127.0.0.1:{self.layout.ports[name]}",
            f"--workers={sizes.get('workers', 1)}",
            f"--threads={sizes.get('threads', 4)}",
            "--timeout=300",
            "--graceful-timeout=5",
            f"--pythonpath={HERE}",
            "--no-control-socket",  # its default path is shared by every gunicorn on the machine
            f"--name=gbpeer-{name}",
            "wsgi_shim:application",
        ]
        self.procs.spawn(name, cmd, {"GB_WSGI_MODULE": module, **config_env})

    def wait_answers(self, name: str, url: str | None = None) -> None:
        log = self.layout.logs / f"{name}.log"
        wait_http(url or self.layout.url(name), self.deadline, log, self.procs.procs[name])

    def run(self) -> dict[str, Any]:
        layout = self.layout
        self.dbs = create_databases(self.state, self.run_id)
        self.vhost = create_vhost(self.state, self.run_id, self.setup_log)
        write_configs(layout, self.dbs, self.vhost)
        self.start_setup(
            {
                "keystone": self.keystone_setup,
                "placement": self.placement_setup,
                "glance": self.glance_setup,
                "nova": self.nova_setup,
            }
        )
        self.procs.spawn("network", [sys.executable, str(HERE / "fake_network.py"),
                                     str(layout.ports["network"])])  # fmt: skip

        # every service validates tokens against Keystone, and needs its user there
        self.wait_setup("keystone")
        keystone_env = {"OS_KEYSTONE_CONFIG_DIR": self.conf("keystone")}
        self.spawn_wsgi("keystone", NOVA_VENV, "keystone.wsgi.api", keystone_env, threads=8)
        self.wait_answers("keystone", layout.auth_url)
        register_catalog(layout)
        self.mark("catalog registered")

        self.wait_setup("placement")
        placement_env = {"OS_PLACEMENT_CONFIG_DIR": self.conf("placement")}
        self.spawn_wsgi("placement", NOVA_VENV, "placement.wsgi.api", placement_env)
        self.wait_setup("glance")
        glance_env = {"OS_GLANCE_CONFIG_DIR": self.conf("glance")}
        self.spawn_wsgi("glance", GLANCE_VENV, "glance.wsgi.api", glance_env)
        self.wait_setup("nova")
        nova_env = {"OS_NOVA_CONFIG_DIR": self.conf("nova")}
        self.spawn_wsgi("nova", NOVA_VENV, "nova.wsgi.osapi_compute", nova_env, workers=2)
        for service in ("nova-conductor", "nova-scheduler"):
            self.procs.spawn(service, [bin_(NOVA_VENV, service), "--config-file",
                                       self.conf("nova", "nova.conf")])  # fmt: skip
        # the compute service registers its resource provider in Placement as it starts
        self.wait_answers("placement")
        compute_conf = self.conf("nova", "nova-compute.conf")
        self.procs.spawn("nova-compute", [bin_(NOVA_VENV, "nova-compute"), "--config-file",
                                          compute_conf])  # fmt: skip
        for name in ("glance", "nova", "network"):
            self.wait_answers(name)
        self.procs.check_alive()
        self.mark("every API answers")
        seeded = self.seed()
        self.mark("a probe server ran")
        return {
            "auth_url": layout.auth_url,
            "username": "admin",
            "password": layout.password,
            "project_name": "admin",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "region": REGION,
            "image_id": seeded["images"][0]["id"],
            **seeded,
            "compute_host": layout.host,
            "run_id": self.run_id,
            "started_in_s": round(time.monotonic() - self.began, 1),
        }

    def seed(self) -> dict[str, Any]:
        """Images, flavors, then one server end to end: proof that scheduling works."""
        conn = sdk_connect(self.layout)
        images = []
        for name in IMAGES:
            # a few bytes: the fake virt driver never boots them
            image = conn.image.create_image(
                name=name,
                data=secrets.token_bytes(4096),
                disk_format="raw",
                container_format="bare",
                visibility="public",
                min_disk=1,
                properties={"os_type": "linux"},
            )
            images.append({"id": image.id, "name": name})
        flavors = []
        for name, vcpu, ram, disk in FLAVORS:
            flavor = conn.compute.create_flavor(
                name=name, vcpus=vcpu, ram=ram, disk=disk, is_public=True
            )
            flavors.append({"id": flavor.id, "name": name})
        network = next(iter(conn.network.networks()))
        self.mark("images and flavors made")

        log = self.layout.logs / "nova-compute.log"
        while not list(conn.placement.resource_providers(name=self.layout.host)):
            self.procs.check_alive()
            if time.monotonic() > self.deadline:
                raise PeerError("the compute host never registered in placement", log)
            time.sleep(0.5)
        self.mark("compute host in placement")
        # until the scheduler has mapped the new host to cell1, a build fails with "No valid
        # host"; it maps it within its discovery interval
        for attempt in itertools.count(1):
            server = conn.compute.create_server(
                name=f"peer-probe-{attempt}",
                image_id=images[0]["id"],
                flavor_id=flavors[0]["id"],
                networks=[{"uuid": network.id}],
            )
            while server.status not in ("ACTIVE", "ERROR") and time.monotonic() < self.deadline:
                time.sleep(0.3)
                server = conn.compute.get_server(server.id)
            conn.compute.delete_server(server.id)
            if server.status == "ACTIVE" and server.addresses:
                break
            fault = (server.fault or {}).get("message", server.status)
            if time.monotonic() > self.deadline:
                raise PeerError(f"a probe server did not become ACTIVE: {fault}", log)
            self.procs.check_alive()
            time.sleep(1)
        conn.compute.wait_for_delete(server, interval=0.3, wait=60)
        conn.close()
        return {"images": images, "flavors": flavors, "network_id": network.id}


def start(state_dir: Path) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    if State(state_dir).load():
        stop(state_dir, quiet=True)  # a fresh peer every time, never one left over
    for sub in ("logs", "etc", "data"):
        shutil.rmtree(state_dir / sub, ignore_errors=True)
    (state_dir / "peer.json").unlink(missing_ok=True)

    launch = Launch(state_dir)
    try:
        description = launch.run()
    except BaseException as exc:
        end_setup_commands()
        report_failure(exc, launch)
        stop(state_dir, quiet=True)
        raise SystemExit(1) from None
    peer_json = state_dir / "peer.json"
    peer_json.write_text(json.dumps(description, indent=2))
    return peer_json


def report_failure(exc: BaseException, launch: Launch) -> None:
    """The error, the log that explains it, and the tail of any other log that has an ERROR."""
    failed_log = exc.log if isinstance(exc, PeerError) else launch.setup_log
    sys.stderr.write(f"peer: failed to start: {exc!r}\n")
    if failed_log is not None:
        sys.stderr.write(f"--- {failed_log} (last lines) ---\n{tail(failed_log)}\n")
    for name in launch.procs.procs:
        path = launch.layout.logs / f"{name}.log"
        if path != failed_log and "ERROR" in path.read_text(errors="replace"):
            sys.stderr.write(f"--- {path} (last lines) ---\n{tail(path, 15)}\n")


def stop(state_dir: Path, quiet: bool = False) -> list[str]:
    state = State(state_dir)
    if not state.load():
        if not quiet:
            print(f"peer: nothing recorded in {state_dir}")
        return []
    end_processes(state.data.get("processes", {}))
    problems = drop_databases(state.data.get("databases", []))
    if state.data.get("vhost"):
        try:
            rabbitmqctl("delete_vhost", state.data["vhost"])
        except (FileNotFoundError, subprocess.SubprocessError) as exc:
            problems.append(f"delete vhost {state.data['vhost']}: {exc}")
    state.path.unlink(missing_ok=True)
    (state_dir / "peer.json").unlink(missing_ok=True)
    for problem in problems:
        sys.stderr.write(f"peer: {problem}\n")
    if not quiet:
        print(f"peer: stopped {state_dir}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in {"start", "stop"}:
        sys.stderr.write(__doc__ or "")
        return 2
    try:
        import openstack  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError:
        venv_python = NOVA_VENV / "bin" / "python"
        if not venv_python.exists():
            sys.stderr.write("peer: run peers/openstack/setup.sh first\n")
            return 2
        os.execv(venv_python, [str(venv_python), __file__, *argv[1:]])  # noqa: S606
    state_dir = Path(argv[2]).resolve()
    if argv[1] == "start":
        print(start(state_dir))
        return 0
    return 1 if stop(state_dir) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
