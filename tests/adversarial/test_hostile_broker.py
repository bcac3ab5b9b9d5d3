"""A malicious broker, played by rewriting rows of the real broker's SQLite store while
it runs (WAL mode: another process may write), against real `sfs-peer` processes.

Each attack must be stopped by a peer: the requester's pins and the manifest signature
before any holder is contacted, or the holder's own pins and share registry. Where the
attack is stopped before contact, the broker also redirects every holder address to a
listening socket of this test (the trap), which must see no connection.
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import nacl.public
import pytest

from sfs.broker.store import add_sql_functions
from sfs.common import crypto
from sfs.common.identity import KeyBundle, format_fingerprint
from sfs.common.manifest import file_id_of
from sfs.common.tree import decode_header
from sfs.peer import keys, session
from sfs.peer.pins import PinStore
from tests.harness import Cluster, Peer, one_line_error, snapshot

# --- the broker's store, from outside ---------------------------------------------------


@contextmanager
def broker_db(cluster: Cluster) -> Iterator[sqlite3.Connection]:
    """A connection to the running broker's database, in autocommit mode, with the SQL
    function the broker's schema uses (in its search index triggers)."""
    db = sqlite3.connect(cluster.root / "broker" / "broker.db", timeout=10, isolation_level=None)
    add_sql_functions(db)
    try:
        yield db
    finally:
        db.close()


def user_id(db: sqlite3.Connection, username: str) -> int:
    (row,) = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchall()
    return int(row[0])


def fresh_key(curve_public: bytes | None = None) -> tuple[crypto.RsaPrivateKey, KeyBundle]:
    """A key pair and bundle nobody has pinned: what a broker would hand out to
    impersonate someone. `curve_public`: keep this transport key (see the first test)."""
    key = crypto.generate_rsa_key()
    curve = curve_public or bytes(nacl.public.PrivateKey.generate().public_key)
    return key, KeyBundle(crypto.public_key_to_der(key.public_key()), curve)


@contextmanager
def substituted_bundle(cluster: Cluster, username: str, bundle: KeyBundle) -> Iterator[None]:
    """The broker gives out `bundle` as `username`'s registered keys, until the end."""
    with broker_db(cluster) as db:
        ((rsa, curve),) = db.execute(
            "SELECT rsa_public, curve_public FROM users WHERE username = ?", (username,)
        ).fetchall()
        db.execute(
            "UPDATE users SET rsa_public = ?, curve_public = ? WHERE username = ?",
            (bundle.rsa_public, bundle.curve_public, username),
        )
    try:
        yield
    finally:
        with broker_db(cluster) as db:
            db.execute(
                "UPDATE users SET rsa_public = ?, curve_public = ? WHERE username = ?",
                (rsa, curve, username),
            )


@contextmanager
def file_row_changed(cluster: Cluster, file_id: str, **columns: object) -> Iterator[None]:
    """The broker's row for `file_id` says `columns` instead of the truth, until the end."""
    names = list(columns)
    with broker_db(cluster) as db:
        (before,) = db.execute(
            f"SELECT {', '.join(names)} FROM files WHERE file_id = ?", (file_id,)
        ).fetchall()
        assignments = ", ".join(f"{name} = ?" for name in names)
        db.execute(
            f"UPDATE files SET {assignments} WHERE file_id = ?", (*columns.values(), file_id)
        )
    try:
        yield
    finally:
        with broker_db(cluster) as db:
            db.execute(f"UPDATE files SET {assignments} WHERE file_id = ?", (*before, file_id))


@contextmanager
def extra_file_row(
    cluster: Cluster, like: str, manifest: bytes, signature: bytes | None = None
) -> Iterator[str]:
    """A public row the broker made up, under the id of `manifest`: a copy of file
    `like` with that manifest (and `signature`, else the old one). Yields the id."""
    file_id = file_id_of(manifest)
    with broker_db(cluster) as db:
        db.execute(
            "INSERT INTO files (file_id, owner_id, name, size, keywords, manifest, signature,"
            " public, shared_at) SELECT ?, owner_id, name, size, keywords, ?,"
            " coalesce(?, signature), 1, shared_at FROM files WHERE file_id = ?",
            (file_id, manifest, signature, like),
        )
    try:
        yield file_id
    finally:
        with broker_db(cluster) as db:
            db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))


class Trap:
    """A listening TCP socket that the broker gives out as every holder's address."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"

    def contacted(self) -> bool:
        """Whether anyone connected (a pending connection makes the socket readable)."""
        readable, _, _ = select.select([self._listener], [], [], 0.2)
        return bool(readable)

    def close(self) -> None:
        self._listener.close()


@contextmanager
def holders_redirected_to_trap(cluster: Cluster) -> Iterator[Trap]:
    """Every lookup lists the trap as the holder's address, heartbeats notwithstanding
    (triggers rewrite each heartbeat's endpoint)."""
    trap = Trap()
    with broker_db(cluster) as db:
        saved = db.execute("SELECT user_id, endpoint FROM presence").fetchall()
        db.execute("UPDATE presence SET endpoint = ?", (trap.endpoint,))
        for event in ("INSERT", "UPDATE OF endpoint"):
            name = "trap_" + event.split()[0].lower()
            db.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON presence"
                f" WHEN NEW.endpoint != '{trap.endpoint}' BEGIN"
                f" UPDATE presence SET endpoint = '{trap.endpoint}' WHERE user_id = NEW.user_id;"
                " END"
            )
    try:
        yield trap
    finally:
        with broker_db(cluster) as db:
            db.execute("DROP TRIGGER trap_insert")
            db.execute("DROP TRIGGER trap_update")
            for user, endpoint in saved:
                db.execute("UPDATE presence SET endpoint = ? WHERE user_id = ?", (endpoint, user))
        trap.close()


def columns_of(cluster: Cluster, file_id: str, *names: str) -> tuple[bytes, ...]:
    with broker_db(cluster) as db:
        (row,) = db.execute(
            f"SELECT {', '.join(names)} FROM files WHERE file_id = ?", (file_id,)
        ).fetchall()
    return tuple(row)


# --- the cluster --------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    cluster: Cluster
    alice: Peer
    bob: Peer
    carol: Peer
    public_id: str
    private_id: str  # shared by alice with bob only
    carols_id: str  # carol's own public file, signed by carol
    originals: dict[str, bytes]  # file id -> content


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice", serve=True)
        bob = cluster.add_peer("bob")
        carol = cluster.add_peer("carol")
        files = {
            "public.bin": os.urandom(300_000),
            "private.txt": b"for bob only\n" * 1000,
            "carol.bin": os.urandom(1000),
        }
        for name, data in files.items():
            (cluster.root / name).write_bytes(data)

        public_id = alice.share(cluster.root / "public.bin")
        private_id = alice.share(cluster.root / "private.txt", "--to", "bob")
        carols_id = carol.share(cluster.root / "carol.bin")
        # First contact both ways: bob pins alice, alice's holder pins bob.
        bob.run("get", private_id).check()
        originals = {
            public_id: files["public.bin"],
            private_id: files["private.txt"],
            carols_id: files["carol.bin"],
        }
        yield World(cluster, alice, bob, carol, public_id, private_id, carols_id, originals)


def pinned(peer: Peer, username: str) -> bytes:
    pin = PinStore(peer.data_dir / "pins.json").get(username)
    assert pin is not None, f"{peer.name} has not pinned {username}"
    fingerprint: bytes = pin.fingerprint
    return fingerprint


def still_serving(world: World, peer: Peer, file_id: str) -> None:
    """The broker and alice's holder still answer: `peer` downloads `file_id`."""
    assert world.cluster.broker is not None and world.cluster.broker.alive()
    assert world.alice.server is not None and world.alice.server.alive()
    got = peer.run("get", file_id, "--json").check().json()
    assert Path(got["path"]).read_bytes() == world.originals[file_id]
    assert "Traceback" not in world.alice.server.output()


# --- key substitution ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["her file", "a file made up with the new key"])
def test_substituted_owner_key_is_refused_by_the_pin_before_contact(
    world: World, target: str
) -> None:
    """The broker hands out a new key as alice's, for her real file or for a manifest
    it made up, names alice and signs with that key (which nothing else can catch).
    Stopped by: the requester's pin for alice (`verify_lookup`, `PinStore.check`).

    Only the RSA key is replaced (which changes the fingerprint just as well): the
    broker binds alice's own session to her registered transport key, so replacing that
    in its store would also log her `serve` out, which a broker lying to bob alone
    would not do."""
    bob = world.bob
    old = format_fingerprint(pinned(bob, "alice"))
    alice_curve = keys.load_identity(world.alice.data_dir, "alice").bundle.curve_public
    fake_key, fake = fresh_key(curve_public=alice_curve)
    new = format_fingerprint(fake.fingerprint())
    (manifest,) = columns_of(world.cluster, world.public_id, "manifest")
    forged = dataclasses.replace(
        decode_header(manifest), share_id=os.urandom(16), owner_fp=fake.fingerprint()
    ).encode()
    before = snapshot(bob.download_dir)

    with (
        substituted_bundle(world.cluster, "alice", fake),
        extra_file_row(
            world.cluster, world.public_id, forged, crypto.sign(fake_key, forged)
        ) as forged_id,
        holders_redirected_to_trap(world.cluster) as trap,
    ):
        result = bob.run("get", world.public_id if target == "her file" else forged_id)
        assert not trap.contacted()

    assert one_line_error(result) == (
        f"error: the key of alice has changed: pinned {old}, now offered {new}. If alice "
        f"really has a new key (check with them), run: sfs-peer trust alice {new} --replace"
    )
    assert result.returncode == 4
    assert snapshot(bob.download_dir) == before
    assert format_fingerprint(pinned(bob, "alice")) == old
    still_serving(world, bob, world.public_id)


def test_substituted_requester_key_is_refused_by_the_holders_pin(world: World) -> None:
    """The broker registers its own keys as bob's, opens a session for them and fetches
    bob's file as "bob". Stopped by: alice's holder's pin for bob (`RequesterCheck`)."""
    cluster, bob = world.cluster, world.bob
    assert pinned(world.alice, "bob")  # alice's holder met the real bob in the fixture
    impostor_dir = cluster.root / "impostor"
    config = cluster.root / "impostor.yaml"
    config.write_text(
        bob.config.read_text()
        .replace("data_dir: bob\n", "data_dir: impostor\n")
        .replace("download_dir: bob/downloads\n", "download_dir: impostor/downloads\n")
    )
    impostor = Peer(cluster, "impostor", config, password="unused")
    impostor.run("init").check()
    impostor_bundle = keys.load_identity(impostor_dir, "bob").bundle
    token = crypto.new_token()
    session.save_session(impostor_dir, session.Session("bob", token, int(time.time()) + 3600))

    with substituted_bundle(cluster, "bob", impostor_bundle), broker_db(cluster) as db:
        db.execute(
            "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
            (crypto.token_digest(token), user_id(db, "bob"), int(time.time()) + 3600),
        )
        try:
            result = impostor.run("get", world.private_id)
        finally:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (crypto.token_digest(token),))

    assert one_line_error(result) == (
        "error: alice: your key does not match the one this holder pinned for you"
    )
    assert result.returncode == 1
    assert snapshot(impostor.download_dir) == {}
    assert world.alice.server is not None
    assert "refused a request: the key of bob has changed" in world.alice.server.output()
    still_serving(world, bob, world.private_id)


# --- access lists -------------------------------------------------------------------------


@pytest.mark.parametrize("lie", ["access row", "public flag"])
def test_widened_access_list_is_refused_by_the_holders_registry(world: World, lie: str) -> None:
    """Carol's lookup succeeds, since the broker says she may; stopped by: alice's
    holder, which checks its own share registry (`HolderService._hello`)."""
    cluster, carol, file_id = world.cluster, world.carol, world.private_id
    before = snapshot(carol.download_dir)

    @contextmanager
    def widened() -> Iterator[None]:
        if lie == "public flag":
            with file_row_changed(cluster, file_id, public=1):
                yield
            return
        with broker_db(cluster) as db:
            db.execute(
                "INSERT INTO access (file_id, user_id) VALUES (?, ?)",
                (file_id, user_id(db, "carol")),
            )
        try:
            yield
        finally:
            with broker_db(cluster) as db:
                db.execute(
                    "DELETE FROM access WHERE file_id = ? AND user_id = ?",
                    (file_id, user_id(db, "carol")),
                )

    with widened():
        hits = carol.run("search", "--json").check().json()["hits"]
        assert file_id in {hit["file_id"] for hit in hits}  # the lie reaches carol
        result = carol.run("get", file_id)

    assert one_line_error(result) == f"error: alice: file {file_id} is not shared with you"
    assert result.returncode == 1
    assert snapshot(carol.download_dir) == before
    assert world.alice.server is not None
    assert f"refused carol: {file_id} is not shared with them" in world.alice.server.output()
    refused = carol.run("get", file_id)  # the truth again: the broker itself refuses
    assert "is shared with you" in one_line_error(refused)
    still_serving(world, carol, world.public_id)


# --- manifests ----------------------------------------------------------------------------


Attack = Callable[[World], AbstractContextManager[tuple[str, str]]]  # -> (file id, message)


@contextmanager
def swapped_for_carols(world: World) -> Iterator[tuple[str, str]]:
    """File public_id's row holds carol's manifest and signature."""
    manifest, signature = columns_of(world.cluster, world.carols_id, "manifest", "signature")
    with file_row_changed(world.cluster, world.public_id, manifest=manifest, signature=signature):
        yield (
            world.public_id,
            f"error: the broker returned a manifest that is not file {world.public_id}",
        )


@contextmanager
def resigned_by_carol(world: World) -> Iterator[tuple[str, str]]:
    """The row says carol owns the file, with carol's valid signature over its bytes."""
    carol = keys.load_identity(world.carol.data_dir, "carol")
    (manifest,) = columns_of(world.cluster, world.public_id, "manifest")
    with broker_db(world.cluster) as db:
        carol_id = user_id(db, "carol")
    with file_row_changed(
        world.cluster, world.public_id, owner_id=carol_id, signature=carol.sign(manifest)
    ):
        yield (
            world.public_id,
            "error: the tree header names a different owner key than the one that signed it",
        )


@contextmanager
def tampered_in_place(world: World) -> Iterator[tuple[str, str]]:
    """One byte of the manifest flipped, under the same id."""
    (manifest,) = columns_of(world.cluster, world.public_id, "manifest")
    tampered = manifest[:-1] + bytes([manifest[-1] ^ 1])
    with file_row_changed(world.cluster, world.public_id, manifest=tampered):
        yield (
            world.public_id,
            f"error: the broker returned a manifest that is not file {world.public_id}",
        )


@contextmanager
def tampered_under_its_own_id(world: World) -> Iterator[tuple[str, str]]:
    """A manifest with another name (and the owner's old signature), listed under the id
    it hashes to, so that the id check alone cannot catch it."""
    (manifest,) = columns_of(world.cluster, world.public_id, "manifest")
    evil = dataclasses.replace(decode_header(manifest), name="run-me.sh").encode()
    with extra_file_row(world.cluster, world.public_id, evil) as evil_id:
        yield evil_id, "error: the tree header signature does not verify"


@contextmanager
def tampered_signature(world: World) -> Iterator[tuple[str, str]]:
    (signature,) = columns_of(world.cluster, world.public_id, "signature")
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    with file_row_changed(world.cluster, world.public_id, signature=forged):
        yield world.public_id, "error: the tree header signature does not verify"


@pytest.mark.parametrize(
    "attack",
    [
        swapped_for_carols,
        resigned_by_carol,
        tampered_in_place,
        tampered_under_its_own_id,
        tampered_signature,
    ],
    ids=["swapped", "re-signed by another user", "tampered", "tampered and re-keyed", "bad sig"],
)
def test_forged_manifest_is_refused_before_contact(world: World, attack: Attack) -> None:
    """Stopped by: the file id (a hash of the manifest), the owner's signature and the
    owner key the manifest names (`verify_lookup`, `verify_manifest`)."""
    bob = world.bob
    before = snapshot(bob.download_dir)

    with attack(world) as (file_id, message), holders_redirected_to_trap(world.cluster) as trap:
        result = bob.run("get", file_id)
        assert not trap.contacted()

    assert one_line_error(result) == message
    assert result.returncode == 3
    assert snapshot(bob.download_dir) == before
    still_serving(world, bob, world.public_id)


# --- what search shows ----------------------------------------------------------------------


def test_a_lie_about_a_share_s_kind_is_shown_only_and_a_bad_kind_is_refused(
    world: World,
) -> None:
    """A broker may call a file a folder of 9 files: search shows it, and nothing acts on
    it (`get` reads the signed header and saves the file). A kind that is neither, or a
    count out of range, is refused by the codec: one line, no traceback."""
    bob = world.bob
    with file_row_changed(world.cluster, world.public_id, kind="folder", file_count=9):
        hits = bob.run("search", "--json").check().json()["hits"]
        [hit] = [h for h in hits if h["file_id"] == world.public_id]
        assert (hit["kind"], hit["files"]) == ("folder", 9)  # the lie reaches bob
        still_serving(world, bob, world.public_id)
    for field, lie in (("kind", {"kind": "link\x1b[2J"}), ("files", {"file_count": -1})):
        with file_row_changed(world.cluster, world.public_id, **lie):
            refused = bob.run("search")
        assert one_line_error(refused).startswith(f"error: {field}: ")
        assert "\x1b" not in refused.stderr
    bob.run("search").check()
