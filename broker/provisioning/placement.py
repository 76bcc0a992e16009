"""Placement: which provider, host and storage pools a new server goes to, and why.

`compute_placement` is pure: it takes the room left on each candidate (from the inventory, after
overcommit) and the server's needs, and picks by best fit, the host left with the least room
once the server is on it, so large holes stay free for large servers. It explains its choice:
the winner, the runners-up and why every other candidate was passed over.
`place` gathers the room from the inventory and books the winner's share there, so that requests
placed before the next sync do not all pile onto the same host.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import bindparam, text, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from broker.core.errors import Conflict
from broker.inventory.models import InventoryHost, InventoryStorage, Provider
from broker.inventory.service import overcommit_ratio

HOST_CLASSES = ("vcpu", "memory_mb")
RULE = "best fit: the host and pools left with the least room after placing the server"
MAX_LISTED = 20


@dataclass(frozen=True)
class HostRoom:
    id: uuid.UUID
    external_id: str
    name: str
    capacity: Mapping[str, int]  # after overcommit
    free: Mapping[str, int]
    up: bool = True


@dataclass(frozen=True)
class PoolRoom:
    id: uuid.UUID
    external_id: str
    name: str
    tier: str
    capacity_gb: int
    free_gb: int


@dataclass(frozen=True)
class Candidate:
    """A provider, the room on it, and what the server would need there (a flavor of one name
    may differ between providers, and so may where the root disk goes)."""

    provider_id: uuid.UUID
    provider: str
    hosts: Sequence[HostRoom]
    pools: Sequence[PoolRoom]
    need: Mapping[str, int] = field(default_factory=dict)
    disks: Mapping[str, int] = field(default_factory=dict)
    # hosts that can build it (those holding its image); None: every host
    able: frozenset[str] | None = None


@dataclass(frozen=True)
class Choice:
    provider_id: uuid.UUID
    provider: str
    host: HostRoom | None  # None: the provider places by itself (no host inventory)
    pools: Mapping[str, PoolRoom]
    score: float
    explanation: dict[str, Any] = field(default_factory=dict)


def _leftover(
    room: Mapping[str, int], capacity: Mapping[str, int], need: Mapping[str, int]
) -> float:
    shares = [(room[c] - need[c]) / capacity[c] for c in need if capacity.get(c)]
    return sum(shares) / len(shares) if shares else 1.0


def _pick_pools(c: Candidate, disks: Mapping[str, int]) -> tuple[dict[str, PoolRoom], list[str]]:
    chosen: dict[str, PoolRoom] = {}
    why: list[str] = []
    for tier, gb in sorted(disks.items()):
        pools = [p for p in c.pools if p.tier == tier]
        if not pools:
            why.append(f"no {tier} storage")
            continue
        fitting = [p for p in pools if p.free_gb >= gb]
        if not fitting:
            most = max(p.free_gb for p in pools)
            why.append(f"{tier} storage has {most} GB free at most, {gb} GB needed")
            continue
        chosen[tier] = min(fitting, key=lambda p: (p.free_gb - gb, p.name))
    return chosen, why


def compute_placement(candidates: Sequence[Candidate]) -> tuple[Choice | None, dict[str, Any]]:
    """The best place for a server needing, on each candidate, `need` (vcpu, memory_mb) and
    `disks` (GB per tier), or None; with the explanation either way."""
    scored: list[tuple[float, str, str, Candidate, HostRoom | None, dict[str, PoolRoom]]] = []
    rejected: list[dict[str, Any]] = []
    for c in sorted(candidates, key=lambda c: c.provider):
        need = {cls: int(c.need.get(cls, 0)) for cls in HOST_CLASSES}
        disks = c.disks
        pools, why = _pick_pools(c, disks)
        if why:
            rejected.append({"provider": c.provider, "why": "; ".join(why)})
            continue
        if not c.hosts:
            rejected.append(
                {"provider": c.provider, "why": "no hosts in the inventory (not synced yet?)"}
            )
            continue
        for h in c.hosts:
            if not h.up:
                rejected.append({"provider": c.provider, "host": h.name, "why": "host is not up"})
                continue
            if c.able is not None and not {h.external_id, h.name} & c.able:
                rejected.append(
                    {"provider": c.provider, "host": h.name, "why": "the image is not on this host"}
                )
                continue
            short = [
                f"{cls} {h.free.get(cls, 0)} free, {need[cls]} needed"
                for cls in HOST_CLASSES
                if h.free.get(cls, 0) < need[cls]
            ]
            if short:
                rejected.append({"provider": c.provider, "host": h.name, "why": "; ".join(short)})
                continue
            disk_share = [
                (p.free_gb - disks[t]) / p.capacity_gb for t, p in pools.items() if p.capacity_gb
            ]
            host_share = _leftover(h.free, h.capacity, need)
            # the host counts most: it is what fragments; pools break ties between hosts
            score = host_share + (sum(disk_share) / len(disk_share) / 100 if disk_share else 0)
            scored.append((score, c.provider, h.name, c, h, pools))
    scored.sort(key=lambda s: (s[0], s[1], s[2]))
    explanation: dict[str, Any] = {
        "rule": RULE,
        "considered": [
            {"provider": s[1], "host": s[2], "score": round(s[0], 4)} for s in scored[:5]
        ],
        "rejected": rejected[:MAX_LISTED],
        "rejected_count": len(rejected),
    }
    if not scored:
        return None, explanation
    score, _, _, cand, host, pools = scored[0]
    explanation["chosen"] = {
        "provider": cand.provider,
        "need": {**cand.need, **{f"storage_gb.{t}": gb for t, gb in sorted(cand.disks.items())}},
        "host": host.name if host else None,
        "pools": {t: p.name for t, p in sorted(pools.items())},
        "score": round(score, 4),
    }
    return Choice(cand.provider_id, cand.provider, host, pools, score, explanation), explanation


class NoPlacement(Conflict):
    """Nothing can take the server: every candidate is named with why."""


Needs = Mapping[uuid.UUID, tuple[Mapping[str, int], Mapping[str, int], frozenset[str] | None]]


# Placement runs in every request's transaction: its statements are Core, built once (ORM
# objects for every host and pool cost more than the choice itself).
_HOST = InventoryHost.__table__  # type: ignore[attr-defined]
_POOL = InventoryStorage.__table__  # type: ignore[attr-defined]


def _locked_rooms(table: Any, *columns: str) -> Any:
    """The providers' (`ids`) hosts or pools still there, locked in id order."""
    c = table.c
    return (
        sa_select(c.id, c.provider_id, c.external_id, c.name, *(c[k] for k in columns))
        .where(c.provider_id.in_(bindparam("ids", expanding=True)), c.gone_at.is_(None))
        .order_by(c.id)
        .with_for_update()
    )


_HOSTS = _locked_rooms(_HOST, "state", "capacity", "allocated", "overcommit")
_POOLS = _locked_rooms(_POOL, "tier", "capacity_gb", "free_gb")
_BOOK_HOST = update(_HOST).where(_HOST.c.id == bindparam("hid")).values(allocated=bindparam("a"))
_BOOK_POOL = update(_POOL).where(_POOL.c.id == bindparam("pid")).values(free_gb=bindparam("f"))
_PG_BOOK = text(
    "WITH h AS (UPDATE inventory_host SET allocated = CAST(:a AS json) WHERE id = :hid)"
    " UPDATE inventory_storage SET free_gb = d.f"
    " FROM unnest(CAST(:pids AS uuid[]), CAST(:fs AS bigint[])) AS d(id, f)"
    " WHERE inventory_storage.id = d.id"
)


def _candidates(
    session: Session, provider_list: Sequence[Provider], needs: Needs
) -> tuple[list[Candidate], dict[uuid.UUID, Mapping[str, int]]]:
    """The room on every candidate, read under row locks (hosts, then pools, each in id order,
    as sync takes them): what is chosen is what is booked, even with requests racing. Also what
    each host has allocated now, to book the choice on."""
    ids = [p.id for p in provider_list]
    hosts: dict[uuid.UUID, list[HostRoom]] = {pid: [] for pid in ids}
    allocated: dict[uuid.UUID, Mapping[str, int]] = {}
    by_id = {p.id: p for p in provider_list}
    conn = session.connection()
    for h in conn.execute(_HOSTS, {"ids": ids}):
        # the row has the columns overcommit_ratio reads from a host
        row = cast(InventoryHost, h)
        capacity = {
            cls: math.floor(
                int(h.capacity.get(cls, 0)) * overcommit_ratio(by_id[h.provider_id], row, cls)
            )
            for cls in HOST_CLASSES
        }
        free = {cls: capacity[cls] - int(h.allocated.get(cls, 0)) for cls in HOST_CLASSES}
        allocated[h.id] = h.allocated
        hosts[h.provider_id].append(
            HostRoom(h.id, h.external_id, h.name, capacity, free, up=h.state in ("up", "connected"))
        )
    pools: dict[uuid.UUID, list[PoolRoom]] = {pid: [] for pid in ids}
    for s in conn.execute(_POOLS, {"ids": ids}):
        pools[s.provider_id].append(
            PoolRoom(s.id, s.external_id, s.name, s.tier, s.capacity_gb, s.free_gb)
        )
    candidates = [
        Candidate(p.id, p.name, hosts[p.id], pools[p.id], *needs[p.id]) for p in provider_list
    ]
    return candidates, allocated


def place(session: Session, provider_list: Sequence[Provider], needs: Needs) -> Choice:
    """Choose, and count the server on the chosen host and pools until sync reports the truth.

    The room is read and booked under row locks, so racing requests never pile onto one host;
    what a host really holds is only known at the next sync, and the provider has the last word:
    a create it refuses fails its job and gives the quota back."""
    candidates, allocated = _candidates(session, provider_list, needs)
    choice, explanation = compute_placement(candidates)
    if choice is None:
        reasons = [
            f"{r['provider']}{'/' + r['host'] if 'host' in r else ''}: {r['why']}"
            for r in explanation["rejected"]
        ]
        raise NoPlacement(
            "no provider can place this server: " + ("; ".join(reasons) or "no candidates"),
            extra={"placement": explanation},
        )
    need, disks, _ = needs[choice.provider_id]
    conn = session.connection()
    # absolute values computed from the rows read under the locks above
    free = {pool.id: max(0, pool.free_gb - int(disks[tier])) for tier, pool in choice.pools.items()}
    if choice.host is not None:
        was = allocated[choice.host.id]
        now = {**was, **{c: int(was.get(c, 0)) + int(need.get(c, 0)) for c in HOST_CLASSES}}
        if free and conn.dialect.name == "postgresql":
            # one round trip for the host and its pools: these locks are every request's
            conn.execute(
                _PG_BOOK,
                {
                    "hid": choice.host.id,
                    "a": json.dumps(now),
                    "pids": list(free),
                    "fs": list(free.values()),
                },
            )
            free = {}
        else:
            conn.execute(_BOOK_HOST, {"hid": choice.host.id, "a": now})
    for pid, left in free.items():
        conn.execute(_BOOK_POOL, {"pid": pid, "f": left})
    _forget_loaded(session, choice)
    return choice


def _forget_loaded(session: Session, choice: Choice) -> None:
    """Host and pool objects this session loaded before must not show the room as it was."""
    keys = [session.identity_key(InventoryStorage, p.id) for p in choice.pools.values()]
    if choice.host is not None:
        keys.append(session.identity_key(InventoryHost, choice.host.id))
    for key in keys:
        loaded = session.identity_map.get(key)
        if loaded is not None:
            session.expire(loaded)
