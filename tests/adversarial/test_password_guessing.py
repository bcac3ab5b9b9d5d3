"""Online password guessing against a real broker: throttled per username and per client
key, and a wrong password reads and costs the same as an unknown username."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import nacl.public
import pytest

from sfs.broker.service import LOGIN_REFUSED
from sfs.common.errors import RemoteError
from sfs.peer.client import BrokerClient
from tests.harness import Cluster, one_line_error

ATTEMPTS = 3
LOCKOUT = 2  # seconds


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker(login_attempts=ATTEMPTS, login_lockout=LOCKOUT)
        running.add_peer("alice")
        running.add_peer("bob")
        yield running


def client(cluster: Cluster, key: nacl.public.PrivateKey | None = None) -> BrokerClient:
    return BrokerClient(cluster.broker_endpoint, cluster.broker_public_key(), key, timeout=10)


def login_error(connection: BrokerClient, username: str, password: str) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        connection.login(username, password)
    return refused.value


def test_guessing_a_password_locks_the_account_for_a_while(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    for _ in range(ATTEMPTS):
        wrong = alice.run("login", "--password-stdin", input="guess\n")
        assert one_line_error(wrong) == f"error: broker: {LOGIN_REFUSED}"
        assert wrong.returncode == 1
    # Now even the right password is refused until the lockout ends, so guessing stops.
    locked = alice.run("login", "--password-stdin", input=alice.password + "\n")
    assert "broker: too many failed logins; try again in" in one_line_error(locked)
    cluster.peers["bob"].run("login", "--password-stdin", input="bob-password\n").check()
    time.sleep(LOCKOUT + 0.5)
    alice.run("login", "--password-stdin", input=alice.password + "\n").check()


def test_one_client_key_guessing_across_accounts_is_locked_out(cluster: Cluster) -> None:
    attacker_key = nacl.public.PrivateKey.generate()
    with client(cluster, attacker_key) as attacker:
        for name in ("carol", "dave", "erin")[:ATTEMPTS]:
            assert str(login_error(attacker, name, "guess")) == f"broker: {LOGIN_REFUSED}"
        throttled = login_error(attacker, "frank", "guess")
        assert throttled.code == "throttled"
        assert "too many failed logins" in str(throttled)
    with client(cluster) as someone_else:  # another key, another username: not affected
        assert login_error(someone_else, "grace", "guess").code == "unauthorized"
    time.sleep(LOCKOUT + 0.5)


def test_unknown_user_and_wrong_password_read_and_cost_the_same() -> None:
    # Real bcrypt cost, and no throttling, so only the password check is timed.
    with Cluster() as cluster:
        cluster.start_broker(bcrypt_rounds=10, login_attempts=1000)
        cluster.add_peer("alice")
        timings: dict[str, list[float]] = {"alice": [], "nobody": []}
        messages = set()
        with client(cluster) as attacker:
            attacker.ping()
            for _ in range(8):
                for username, times in timings.items():
                    start = time.perf_counter()
                    error = login_error(attacker, username, "guess")
                    times.append(time.perf_counter() - start)
                    messages.add((error.code, str(error)))
    assert messages == {("unauthorized", f"broker: {LOGIN_REFUSED}")}
    known, unknown = (statistics.median(times) for times in timings.values())
    assert known > 0.01  # bcrypt really ran (10 rounds is tens of milliseconds)
    # Skipping bcrypt for unknown users would make this ratio 50 or more: a wide band
    # tells that apart and stays clear of scheduling noise on a busy machine.
    assert 0.5 < known / unknown < 2, timings
