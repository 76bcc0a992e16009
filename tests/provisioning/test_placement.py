"""Placement as a pure function: best fit, the explanation, and why nothing fits."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from broker.provisioning.placement import Candidate, HostRoom, PoolRoom, compute_placement

P1, P2 = uuid.uuid4(), uuid.uuid4()


def host(name: str, vcpu: int, memory_mb: int, *, cap: int = 64, up: bool = True) -> HostRoom:
    return HostRoom(
        uuid.uuid4(),
        name,
        name,
        {"vcpu": cap, "memory_mb": cap * 4096},
        {"vcpu": vcpu, "memory_mb": memory_mb},
        up,
    )


def pool(name: str, tier: str, free_gb: int, capacity_gb: int = 1000) -> PoolRoom:
    return PoolRoom(uuid.uuid4(), name, name, tier, capacity_gb, free_gb)


NEED = {"vcpu": 4, "memory_mb": 8192}


def test_best_fit_picks_the_host_left_with_the_least_room() -> None:
    hosts = [host("roomy", 60, 240000), host("snug", 6, 12000), host("full", 2, 4096)]
    choice, why = compute_placement(
        [Candidate(P1, "p1", hosts, [pool("ssd-1", "ssd", 500)], NEED, {"ssd": 20})]
    )
    assert choice is not None and choice.host is not None and choice.host.name == "snug"
    assert why["chosen"]["host"] == "snug" and why["chosen"]["pools"] == {"ssd": "ssd-1"}
    assert [c["host"] for c in why["considered"]] == ["snug", "roomy"]
    assert why["rejected"] == [
        {
            "provider": "p1",
            "host": "full",
            "why": "vcpu 2 free, 4 needed; memory_mb 4096 free, 8192 needed",
        }
    ]


def test_pools_are_chosen_by_best_fit_per_tier_and_a_missing_tier_rules_a_provider_out() -> None:
    c1 = Candidate(
        P1,
        "p1",
        [host("h1", 32, 65536)],
        [pool("big", "hdd", 900), pool("small", "hdd", 60)],
        NEED,
        {"hdd": 50},
    )
    c2 = Candidate(P2, "p2", [host("h2", 5, 9000)], [pool("ssd", "ssd", 900)], NEED, {"hdd": 50})
    choice, why = compute_placement([c1, c2])
    assert choice is not None and choice.provider == "p1" and choice.pools["hdd"].name == "small"
    assert {"provider": "p2", "why": "no hdd storage"} in why["rejected"]


def test_nothing_fits_names_every_candidate_and_why() -> None:
    c1 = Candidate(P1, "p1", [host("h1", 2, 2048), host("down", 64, 262144, up=False)], [], NEED)
    c2 = Candidate(P2, "p2", [], [], NEED)
    choice, why = compute_placement([c1, c2])
    assert choice is None and "chosen" not in why
    reasons = {(r["provider"], r.get("host")): r["why"] for r in why["rejected"]}
    assert reasons[("p1", "down")] == "host is not up"
    assert "vcpu 2 free" in reasons[("p1", "h1")]
    assert reasons[("p2", None)].startswith("no hosts")


def test_hosts_without_the_image_are_passed_over_with_the_reason() -> None:
    c = Candidate(
        P1, "p1", [host("a", 8, 16384), host("b", 60, 240000)], [], NEED, {}, frozenset({"b"})
    )
    choice, why = compute_placement([c])
    assert choice is not None and choice.host is not None and choice.host.name == "b"
    assert {"provider": "p1", "host": "a", "why": "the image is not on this host"} in why[
        "rejected"
    ]


ROOMS = st.lists(
    st.tuples(st.integers(0, 64), st.integers(0, 262144), st.booleans()), min_size=0, max_size=8
)


@given(rooms=ROOMS, vcpu=st.integers(1, 32), memory_mb=st.integers(1, 131072))
def test_the_choice_always_fits_and_is_the_tightest_fit(
    rooms: list[tuple[int, int, bool]], vcpu: int, memory_mb: int
) -> None:
    hosts = [host(f"h{n}", v, m, up=up) for n, (v, m, up) in enumerate(rooms)]
    need = {"vcpu": vcpu, "memory_mb": memory_mb}
    choice, why = compute_placement([Candidate(P1, "p1", hosts, [], need)])
    fitting = [
        h for h in hosts if h.up and h.free["vcpu"] >= vcpu and h.free["memory_mb"] >= memory_mb
    ]
    if not fitting:
        assert choice is None and why["rejected_count"] == len(hosts) + (0 if hosts else 1)
        return
    assert choice is not None and choice.host in fitting
    assert len(why["rejected"]) == len(hosts) - len(fitting)

    def leftover(h: HostRoom) -> float:
        return sum((h.free[c] - need[c]) / h.capacity[c] for c in need) / len(need)

    assert leftover(choice.host) == min(leftover(h) for h in fitting)
