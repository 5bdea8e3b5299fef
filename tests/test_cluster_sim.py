"""Deterministic cluster simulation (tests/cluster_sim.py): random seeds plus hand-written
scenarios for the F9a cases (late joiners through seeds, a restarted lowest-id node), a
long partition with presence, replayability, and a broken network the checks must catch.

``WSE_CLUSTER_SIM_SEEDS=N`` runs N random seeds (default 100) starting at
``WSE_CLUSTER_SIM_BASE`` (default 0), for soak runs; a failure prints the seed and the step
list to replay it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_sim import (
    Conn,
    SimFailure,
    Simulation,
    Step,
    address_of,
    make_scenario,
    run_seed,
)

SEEDS = int(os.environ.get("WSE_CLUSTER_SIM_SEEDS", "100"))
BASE = int(os.environ.get("WSE_CLUSTER_SIM_BASE", "0"))


@pytest.mark.parametrize("seed", range(BASE, BASE + SEEDS))
def test_random_seed(seed: int) -> None:
    sim = run_seed(seed)
    assert sim.stats["owed"] > 0  # the run did check deliveries


def test_random_runs_exercise_the_faults() -> None:
    """The generator really produces the situations the invariants are about."""
    totals: dict[str, int] = {}
    for seed in range(12):
        sim = run_seed(seed)
        for key, value in sim.stats.items():
            totals[key] = totals.get(key, 0) + value
    for key in (
        "down:superseded",
        "down:heartbeat timeout",
        "down:peer shutdown",
        "down:aborted",
        "dial_failed",
        "recover_ok",
        "recover_no",
        "presence_notify",
    ):
        assert totals.get(key, 0) > 0, key


# --------------------------------------------------------------------------- hand-written scenarios


def subs_and_pubs(t0: float, n: int, rounds: int = 3) -> list[Step]:
    steps: list[Step] = []
    t = t0
    for i in range(n):
        steps.append((t, ("sub", i, ("room.1", "room.*", "news", "*")[i % 4])))
        t += 0.1
    for r in range(rounds):
        for i in range(n):
            steps.append((t, ("pub", i, ("room.1", "news")[(i + r) % 2])))
            t += 0.3
    return steps


def test_late_joiners_through_a_chain_of_seeds() -> None:
    """Each node only knows the one started before it and has a higher id: the original
    never links them (its tiebreak stops the later dialer); here the mesh is full."""
    steps: list[Step] = [(0.0, ("start", 0, ()))]
    steps += [(2.0 * i, ("start", i, (address_of(i - 1),))) for i in range(1, 5)]
    steps += subs_and_pubs(12.0, 5)
    steps.append((40.0, ("heal",)))
    sim = Simulation(1, steps, n_nodes=5, max_delay=0.05, dial_drop=0.0, chaos_time=40.0).run()
    higher_dialed = 0
    for sn in sim.live():
        assert sn.node.peer_count == 4
        for peer in sn.node.peers():
            link = sn.node.link_of(peer)
            assert link is not None
            higher_dialed += link.role.value == "dialer" and sn.instance_id > peer
    assert higher_dialed > 0  # links the original's rule would have refused


@pytest.mark.parametrize("graceful", [False, True])
def test_lowest_id_node_restarts_and_relinks(graceful: bool) -> None:
    """The restarted node comes back with the highest id; the original never re-forms
    the link to a node it used to out-rank."""
    steps: list[Step] = [(0.0, ("start", 0, ()))]
    steps += [(1.0 + i, ("start", i, (address_of(0),))) for i in range(1, 4)]
    steps += subs_and_pubs(10.0, 4)
    steps += [(20.0, ("stop", 0, graceful)), (25.0, ("restart", 0))]
    steps += subs_and_pubs(40.0, 4)
    steps.append((60.0, ("heal",)))
    sim = Simulation(2, steps, n_nodes=4, max_delay=0.02, dial_drop=0.0, chaos_time=60.0).run()
    ids = sorted(sn.instance_id for sn in sim.live())
    assert ids[-1] == sim.nodes[0].instance_id  # highest id now, and linked to all
    assert sim.nodes[0].node.peer_count == 3


def test_long_partition_with_presence_and_recovery() -> None:
    """Links die of silence, presence of the far side is purged, then everything comes
    back; clients recover on other nodes."""
    steps: list[Step] = [
        (0.0, ("start", i, tuple(address_of(j) for j in range(i)))) for i in range(4)
    ]
    steps += [(5.0, ("pjoin", i, ("alice", "bob", "carol", "dave")[i], "lobby")) for i in range(4)]
    steps += subs_and_pubs(6.0, 4)
    steps += [
        (20.0, ("partition", (0, 1))),
        (25.0, ("pleave", 0, 0)),
        (26.0, ("pjoin", 2, "eve", "room.1")),
    ]
    steps += [(30.0 + 0.5 * k, ("pub", k % 4, "room.1")) for k in range(20)]
    steps += [(80.0, ("heal",))]
    steps += [(85.0 + 0.5 * k, ("recover", k * 7919, k % 4)) for k in range(20)]
    steps.append((100.0, ("heal",)))
    sim = Simulation(3, steps, n_nodes=4, max_delay=0.05, dial_drop=0.0, chaos_time=100.0).run()
    assert sim.stats["down:heartbeat timeout"] > 0
    members = sim.nodes[3].presence.members("lobby")
    assert set(members) == {"bob", "carol", "dave"}


def test_scenarios_and_runs_are_deterministic() -> None:
    assert make_scenario(11) == make_scenario(11)
    first = run_seed(11)
    again = Simulation(11, first.scenario.steps).run()
    assert first.digest() == again.digest()
    assert first.trace == again.trace


def test_deterministic_across_processes_and_hash_seeds() -> None:
    script = Path(__file__).with_name("cluster_sim.py")
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, str(script), "5", "--digest"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        digests.add(out.stdout.strip())
    assert digests == {run_seed(5).digest()}


# --------------------------------------------------------------------------- the checks can fail


class DuplicatingNetwork(Simulation):
    """A broken network that delivers chunks carrying publications twice (TCP never
    would): the exactly-once check must catch it."""

    def transmit(self, conn: Conn, side: int, item: tuple[str, bytes]) -> None:
        super().transmit(conn, side, item)
        if item[0] == "data" and b'"t":"sim"' in item[1]:
            super().transmit(conn, side, item)


class LossyNetwork(Simulation):
    """A broken network that silently loses every 5th chunk without closing the link."""

    count = 0

    def transmit(self, conn: Conn, side: int, item: tuple[str, bytes]) -> None:
        self.count += 1
        if self.count % 5:
            super().transmit(conn, side, item)


def replay_args(message: str) -> tuple[int, list[Step], dict[str, Any]]:
    seed = int(re.search(r"seed=(\d+)", message).group(1))  # type: ignore[union-attr]
    call = re.search(r"replay: Simulation\(\d+, STEPS, (.*)\)\.run\(\)", message)
    assert call is not None
    kwargs = {
        key: ast.literal_eval(value)
        for key, value in (part.split("=") for part in call.group(1).split(", "))
    }
    block = message[message.index("STEPS = [") + len("STEPS = ") : message.index("\n]\n") + 2]
    return seed, ast.literal_eval(block), kwargs


@pytest.mark.parametrize("broken", [DuplicatingNetwork, LossyNetwork])
def test_a_broken_network_fails_with_a_replayable_report(broken: type[Simulation]) -> None:
    with pytest.raises(SimFailure) as caught:
        broken(4).run()
    message = str(caught.value)
    assert message.startswith("cluster simulation seed=4 failed at t=")
    assert "last trace lines:" in message
    seed, steps, kwargs = replay_args(message)
    assert seed == 4 and steps == Simulation(4).scenario.steps
    with pytest.raises(SimFailure) as again:
        broken(seed, steps, **kwargs).run()
    assert str(again.value).splitlines()[0] == message.splitlines()[0]
