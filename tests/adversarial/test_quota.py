"""A registered user filling the broker's disk with manifests: per-user limits on the
number of files shared and on the bytes of their manifests, against a real broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sfs.common import protocol
from sfs.common.errors import RemoteError
from sfs.common.manifest import file_id_of
from sfs.peer.client import BrokerClient
from sfs.peer.keys import load_identity
from sfs.peer.session import load_session
from tests.harness import Cluster, one_line_error
from tests.trees import largest_header

FILES = 3
MANIFEST_MIB = 1
HEADER = 69_873  # bytes of the largest tree header: 16 of them pass the 1 MiB limit


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        running.start_broker(quota_files=FILES, quota_manifest_mib=MANIFEST_MIB)
        running.add_peer("alice")
        running.add_peer("bob")
        yield running


def test_sharing_past_the_file_limit_is_refused_with_the_numbers(cluster: Cluster) -> None:
    alice = cluster.peers["alice"]
    files = []
    for number in range(FILES + 1):
        path = cluster.root / f"note-{number}.txt"
        path.write_text(f"note {number}\n")
        files.append(path)
    shared = [alice.share(path) for path in files[:FILES]]
    refused = alice.run("share", str(files[FILES]))
    assert one_line_error(refused) == (
        f"error: broker: share refused: you share {FILES} files, and the broker allows"
        f" {FILES} per user (quota_files); unshare some first"
    )
    assert refused.returncode == 1
    alice.run("unshare", shared[0]).check()  # unsharing makes room again
    alice.share(files[FILES])


@pytest.fixture(scope="module")
def many_files_cluster() -> Iterator[Cluster]:
    """A broker whose file limit is out of the way: tree headers are at most 70 KB, so
    reaching 1 MiB takes 16 of them."""
    with Cluster() as running:
        running.start_broker(quota_files=100, quota_manifest_mib=MANIFEST_MIB)
        running.add_peer("bob")
        yield running


def test_manifests_past_the_byte_limit_are_refused_with_the_numbers(
    many_files_cluster: Cluster,
) -> None:
    cluster = many_files_cluster
    """bob publishes crafted manifests directly: 9 MiB each would be as easy."""
    bob = cluster.peers["bob"]
    identity = load_identity(bob.data_dir, "bob")
    token = load_session(bob.data_dir, "bob").token
    key = cluster.broker_public_key()

    def publish_big() -> str:
        manifest = largest_header("bob", identity.fingerprint)
        assert len(manifest) == HEADER
        grant = identity.sign(protocol.grant_payload(file_id_of(manifest), None))
        return broker.publish(token, manifest, identity.sign(manifest), None, grant)

    with BrokerClient(cluster.broker_endpoint, key, identity.transport_key) as broker:
        for _ in range((1 << 20) // HEADER):
            publish_big()
        with pytest.raises(RemoteError) as refused:
            publish_big()
    assert refused.value.code == "forbidden"
    message = str(refused.value)
    assert message == (
        "broker: share refused: with this manifest (0.1 MiB), yours would take 1.1 MiB at"
        " the broker, over its 1 MiB per user (quota_manifest_mib); unshare some first"
    )
