#!/usr/bin/env python
"""Benchmark of a full inventory sync of a vCenter with thousands of VMs (the vCenter simulator).

    .venv/bin/python bench/vmware_sync.py [--vms 5000] [--repeat 3] [--naive-sample 200]

Prints exactly one JSON line on stdout (progress goes to stderr). What it does:

* builds and starts the project's vCenter simulator (peers/vcsim) with `--vms` VMs (5 clusters
  of 2 hosts, the VMs spread over the clusters), and creates its own uniquely named PostgreSQL
  database, migrated, with a center tenant and one vmware provider pointing at the simulator;
  both are removed at the end, also on error;
* the floor: one raw paged PropertyCollector pass (`RetrievePropertiesEx` and
  `ContinueRetrievePropertiesEx` over a ContainerView) for exactly the properties the driver
  reads (`drivers.vmware.VM_PROPERTIES`), with pyvmomi and nothing else: best of `--repeat`;
* govbroker: `broker.inventory.sync.sync_provider` — driver connection, hosts, datastores,
  networks and the VM pass, conversion, and the database writes — first on the empty database
  (every VM inserted) and then `--repeat` times on the populated one (compare and write only what
  changed); each is a full sync, not an incremental one;
* naive: every VM's properties read one at a time, one PropertyCollector call per property per
  VM (what walking pyvmomi objects attribute by attribute amounts to), for the same properties,
  timed over `--naive-sample` VMs and scaled to every VM;
* peak RSS of this process and of the simulator.

targets_met is true only when the initial sync and the best repeated sync each take at most
1.3 × the raw pass, and the naive way would take at least 20 × as long as the slower of them.
Every figure is measured in the run that prints it. Wall-clock time is the measure; CPU time of
this process is printed beside it, because a busy machine moves wall-clock times more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_DSN = os.environ.get("GOVBROKER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGETS = {"max_sync_over_raw": 1.3, "min_naive_over_sync": 20.0, "min_vms": 5000}
CLUSTERS = 5
HOSTS_PER_CLUSTER = 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def vm_refs(oob: Any, limit: int) -> list[Any]:
    from pyVmomi import vim

    content = oob._content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return [vm for vm in view.view if not vm.config.template][:limit]
    finally:
        view.DestroyView()


def naive_read(collector: Any, vm: Any, paths: tuple[str, ...]) -> dict[str, Any]:
    """The naive way: one PropertyCollector call per property of one VM (what walking pyvmomi
    objects attribute by attribute amounts to), for the same properties as the bulk pass."""
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    out: dict[str, Any] = {}
    for path in paths:
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=vm, skip=False)],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=[path])],
        )
        for content in collector.RetrieveContents([spec]):
            for prop in content.propSet or ():
                out[prop.name] = prop.val
    return out


def rss_mb_of(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-sample", type=int, default=200)
    args = parser.parse_args()
    # keys of this run only: the bench must not write key files into the working tree
    from cryptography.fernet import Fernet

    os.environ.setdefault("GOVBROKER_FERNET_KEY", Fernet.generate_key().decode())
    os.environ.setdefault("GOVBROKER_SECRET_KEY", uuid.uuid4().hex * 2)
    os.environ.setdefault("GOVBROKER_LOG_LEVEL", "WARNING")

    import psycopg

    from broker import migrations
    from broker.core.authz import Principal
    from broker.core.db import Database
    from broker.inventory import providers, sync
    from broker.inventory.schemas import ProviderCreate
    from broker.tenancy import service as tenancy
    from drivers.vmware import VM_PROPERTIES
    from tests.peers.vcsim import DATASTORE_TIERS, VcsimModel, VcsimPeer

    per_cluster = -(-args.vms // CLUSTERS)
    model = VcsimModel(
        clusters=CLUSTERS, hosts_per_cluster=HOSTS_PER_CLUSTER, standalone_hosts=0, vms=per_cluster
    )
    dbname = f"gb_bench_vmsync_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN_DSN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{dbname}"')
    db: Database | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="gb-vmsync-") as work:
            log(f"starting vcsim with {per_cluster * CLUSTERS} VMs")
            started = time.perf_counter()
            with VcsimPeer(Path(work), model=model) as peer:
                log(f"vcsim ready in {time.perf_counter() - started:.1f} s")
                url = ADMIN_DSN.rsplit("/", 1)[0].replace(
                    "postgresql://", "postgresql+psycopg://", 1
                )
                db = Database(f"{url}/{dbname}")
                migrations.upgrade(db.url)
                system = Principal.system("bench")
                with db.unit_of_work() as s:
                    tenancy.create_center(s, system, code="center", name_zh="基准测试中心")
                    provider_id = providers.create_provider(
                        s,
                        system,
                        ProviderCreate(
                            kind="vmware",
                            name="vcsim-bench",
                            endpoint=peer.endpoint,
                            credentials=peer.credentials,
                            options={
                                "verify_tls": False,
                                "timeout_s": 120,
                                "datastore_tiers": DATASTORE_TIERS,
                                "ip_allocation": "none",
                            },
                            adopt_by_owner=False,
                        ),
                    ).id

                with peer.out_of_band() as oob:
                    vm_count = len(oob.vm_ids())
                    raw: list[tuple[float, float]] = []
                    for i in range(args.repeat):
                        wall, cpu, n = timed(lambda: oob.retrieve_vms(VM_PROPERTIES, 500))
                        raw.append((wall, cpu))
                        log(f"raw pass {i + 1}: {n} objects in {wall:.2f} s (cpu {cpu:.2f} s)")

                    def one_sync() -> sync.Outcome:
                        assert db is not None
                        outcome = sync.sync_provider(db, provider_id, trigger="bench")
                        if outcome.status != "ok":
                            raise RuntimeError(f"sync failed: {outcome.error}")
                        return outcome

                    wall, cpu, first = timed(one_sync)
                    initial = (wall, cpu)
                    log(f"initial sync: {first.counts.get('servers_new')} new in {wall:.2f} s")
                    repeated: list[tuple[float, float]] = []
                    for i in range(args.repeat):
                        wall, cpu, again = timed(one_sync)
                        repeated.append((wall, cpu))
                        log(
                            f"repeat sync {i + 1}: {again.counts.get('servers_seen')} VMs"
                            f" in {wall:.2f} s"
                        )

                    sample = vm_refs(oob, args.naive_sample)
                    collector = oob._content.propertyCollector
                    wall, cpu, _ = timed(
                        lambda: [naive_read(collector, vm, VM_PROPERTIES) for vm in sample]
                    )
                    naive_per_vm = wall / len(sample)
                    log(
                        f"naive: {len(sample)} VMs in {wall:.2f} s"
                        f" ({naive_per_vm * 1000:.1f} ms per VM)"
                    )
                    vcsim_rss = rss_mb_of(peer.pid)

        raw_best = min(raw)[0]
        repeat_best = min(repeated)[0]
        slower_sync = max(initial[0], repeat_best)
        naive_total = naive_per_vm * vm_count
        figures = {
            "initial_over_raw": round(initial[0] / raw_best, 3),
            "repeat_over_raw": round(repeat_best / raw_best, 3),
            "naive_over_sync": round(naive_total / slower_sync, 1),
        }
        met = (
            vm_count >= TARGETS["min_vms"]
            and figures["initial_over_raw"] <= TARGETS["max_sync_over_raw"]
            and figures["repeat_over_raw"] <= TARGETS["max_sync_over_raw"]
            and figures["naive_over_sync"] >= TARGETS["min_naive_over_sync"]
        )
        print(
            json.dumps(
                {
                    "bench": "vmware_sync",
                    "vms": vm_count,
                    "hosts": CLUSTERS * HOSTS_PER_CLUSTER,
                    "raw_pass_s": round(raw_best, 3),
                    "raw_pass_cpu_s": round(min(raw, key=lambda r: r[0])[1], 3),
                    "initial_sync_s": round(initial[0], 3),
                    "initial_sync_cpu_s": round(initial[1], 3),
                    "repeat_sync_s": round(repeat_best, 3),
                    "repeat_sync_cpu_s": round(min(repeated)[1], 3),
                    "naive_per_vm_ms": round(naive_per_vm * 1000, 2),
                    "naive_sample": len(sample),
                    "naive_full_s_estimated": round(naive_total, 1),
                    **figures,
                    "targets": TARGETS,
                    "targets_met": met,
                    "peak_rss_mb": {
                        "bench": round(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                        ),
                        "vcsim": vcsim_rss,
                    },
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "load_avg": [round(x, 2) for x in os.getloadavg()],
                    },
                },
                separators=(", ", ": "),
            )
        )
        return 0
    finally:
        if db is not None:
            db.dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
