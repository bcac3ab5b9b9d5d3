"""`Downloader.fetch` over in-memory channels to real `HolderService`s: the engine's
failover, set-aside, timeouts and convictions, with no socket anywhere (the connector is
the real one, over `MemoryDialer`). Deadlines are short where a test waits one out, and
nothing asserts how long anything took."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfs.common import protocol
from sfs.common.errors import IntegrityError, RemoteError, TransportError
from sfs.common.protocol import ErrorCode, Refused
from sfs.common.tree_index import Pages, TreeIndex
from sfs.peer.channel import Channel, Interrupt
from sfs.peer.connect import Connector, DataDialer
from sfs.peer.download import (
    Downloader,
    DownloadInterrupted,
    DownloadProgress,
    DownloadResult,
)
from sfs.peer.hints import DirectHint, RelayHint
from sfs.peer.keys import Identity
from sfs.peer.pins import PinStore
from sfs.peer.registry import Share
from tests.unit.memory_holders import CHUNK, MemoryDialer, MemoryHolder, lookup_of, share_of

DATA = random.Random(8).randbytes(9 * CHUNK + 500)  # chunks 0-9, the last short
CHUNKS = 10


@pytest.fixture(scope="module")
def share(alice: Identity) -> Share:
    return share_of(alice, DATA)


def fetch(
    bob: Identity,
    tmp_path: Path,
    share: Share,
    owner: Identity,
    dialer: MemoryDialer,
    holders: list[MemoryHolder],
    *,
    window: int = 2,
    timeout: float = 60,
    hello_timeout: float = 60,
    extra: list[str] | None = None,
    progress: DownloadProgress | None = None,
    data_dialer: DataDialer | None = None,
) -> DownloadResult:
    """bob's download of `share` from `holders` (plus endpoints `extra`, as carol's)."""
    connector = Connector({DirectHint: dialer}, timeout)
    downloader = Downloader(
        bob,
        PinStore(tmp_path / "pins.json"),
        None,
        window=window,
        timeout=timeout,
        hello_timeout=hello_timeout,
        connector=connector,
        data_dialer=data_dialer,
    )
    listed = [holder.holder for holder in holders]
    try:
        lookup = lookup_of(owner, share, listed)
        return downloader.fetch(share.file_id, lookup, tmp_path / "in", progress)
    finally:
        dialer.join()


def partial_of(tmp_path: Path, share: Share) -> Path:
    return tmp_path / "in" / f".sfs-{share.file_id}.part"


def test_a_whole_download_from_one_holder(
    alice: Identity, bob: Identity, share: Share, tmp_path: Path
) -> None:
    from_alice = MemoryHolder(alice, share, DATA)
    dialer = MemoryDialer(from_alice)
    result = fetch(bob, tmp_path, share, alice, dialer, [from_alice], window=3)
    assert result.path.read_bytes() == DATA
    assert (result.holders, result.bytes_fetched, result.chunks_resumed) == (
        ["alice"],
        len(DATA),
        0,
    )
    assert from_alice.chunks_sent == CHUNKS  # each chunk asked for once
    assert from_alice.service.active_transfers == 0  # bob said finish


def test_two_holders_share_the_work(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path
) -> None:
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    both_started = threading.Barrier(2, timeout=20)
    for holder in (from_alice, from_carol):  # neither can finish alone before the other starts

        def first_waits(sent: int) -> None:
            if sent == 0:
                both_started.wait()

        holder.before_chunk = first_waits
    dialer = MemoryDialer(from_alice, from_carol)
    result = fetch(bob, tmp_path, share, alice, dialer, [from_alice, from_carol], window=1)
    assert result.path.read_bytes() == DATA
    assert sorted(result.holders) == ["alice", "carol"]
    assert from_alice.chunks_sent + from_carol.chunks_sent == CHUNKS


def test_progress_names_the_holders_sending(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path
) -> None:
    """The bar says who it is waiting for: each report names the holders sending now."""
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    both_started = threading.Barrier(2, timeout=20)
    for holder in (from_alice, from_carol):

        def first_waits(sent: int) -> None:
            if sent == 0:
                both_started.wait()

        holder.before_chunk = first_waits
    reports: list[tuple[int, int, list[str], tuple[int, int]]] = []
    dialer = MemoryDialer(from_alice, from_carol)
    fetch(
        bob,
        tmp_path,
        share,
        alice,
        dialer,
        [from_alice, from_carol],
        window=1,
        progress=lambda done, total, holders, files: reports.append((done, total, holders, files)),
    )
    assert ["alice", "carol"] in [holders for _, _, holders, _ in reports]
    assert all(total == len(DATA) for _, total, _, _ in reports)
    assert max(done for done, _, _, _ in reports) == len(DATA)
    # files whole: the one file of this share, once its last chunk is in
    assert reports[0][3] == (0, 1) and reports[-1][3] == (1, 1)
    assert all(files == (0, 1) for done, _, _, files in reports if done < len(DATA))


def test_busy_then_served(alice: Identity, bob: Identity, share: Share, tmp_path: Path) -> None:
    refusals = 3

    def busy_at_first(requester: str, bundle: object) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise Refused(ErrorCode.BUSY, "checking your key; retry")

    from_alice = MemoryHolder(alice, share, DATA, busy_at_first)
    dialer = MemoryDialer(from_alice)
    result = fetch(bob, tmp_path, share, alice, dialer, [from_alice])
    assert result.path.read_bytes() == DATA
    assert refusals == 0
    # One channel for the index, one for the chunks: each keeps its channel, hello after hello.
    assert dialer.dialed == [from_alice.endpoint] * 2


def test_busy_for_longer_than_the_timeout(
    alice: Identity, bob: Identity, share: Share, tmp_path: Path
) -> None:
    def always_busy(requester: str, bundle: object) -> None:
        raise Refused(ErrorCode.BUSY, "checking your key; retry")

    from_alice = MemoryHolder(alice, share, DATA, always_busy)
    with pytest.raises(RemoteError, match=r"^alice: checking your key; retry$"):
        fetch(bob, tmp_path, share, alice, MemoryDialer(from_alice), [from_alice], timeout=0.5)
    assert from_alice.frames_seen > 1  # it did ask again
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").iterdir())


def test_a_holder_that_never_answers(
    alice: Identity, bob: Identity, share: Share, tmp_path: Path
) -> None:
    """The only holder takes the channel and never reads: the hello times out."""
    from_alice = MemoryHolder(alice, share, DATA)
    dialer = MemoryDialer(from_alice)
    dialer.mute.add(from_alice.endpoint)
    with pytest.raises(
        TransportError,
        match=r"^alice at memory://alice did not answer the request within 0\.3 s$",
    ):
        fetch(bob, tmp_path, share, alice, dialer, [from_alice], timeout=0.3)
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").iterdir())


def test_a_holder_that_cannot_be_reached(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path
) -> None:
    """carol's endpoint opens no channel; alice delivers everything."""
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    dialer = MemoryDialer(from_alice)  # carol is not there
    result = fetch(bob, tmp_path, share, alice, dialer, [from_carol, from_alice])
    assert result.path.read_bytes() == DATA
    assert result.holders == ["alice"]


@pytest.mark.parametrize("how", ["hangs up", "goes silent"])
def test_failover_to_a_second_holder_mid_download(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path, how: str
) -> None:
    """carol sends 3 chunks, then hangs up or withholds the rest; only then can bob
    reach alice. alice sends every chunk left, those carol had been asked for included."""
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    if how == "hangs up":
        from_carol.hang_up_from = 3
    else:
        from_carol.silent_from = 3
    dialer = MemoryDialer(from_alice, from_carol)
    dialer.gates[from_alice.endpoint] = from_carol.let_down
    result = fetch(
        bob,
        tmp_path,
        share,
        alice,
        dialer,
        [from_carol, from_alice],
        window=2,
        timeout=1.0 if how == "goes silent" else 60,  # bob waits this long for carol
    )
    assert result.path.read_bytes() == DATA
    assert sorted(result.holders) == ["alice", "carol"]
    assert (from_carol.chunks_sent, from_alice.chunks_sent) == (3, CHUNKS - 3)


def test_a_silent_holder_is_set_aside_while_another_delivers(
    alice: Identity,
    bob: Identity,
    carol: Identity,
    share: Share,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """carol never answers her hello; alice holds chunk 1 back until carol is set aside,
    so the download could only end by setting carol aside (its timeout is a minute)."""
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    set_aside = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("set carol aside"):
                set_aside.set()

    def hold_back(sent: int) -> None:
        if sent == 1:
            set_aside.wait(20)

    from_alice.before_chunk = hold_back
    dialer = MemoryDialer(from_alice, from_carol)
    dialer.mute.add(from_carol.endpoint)
    watch = Watch()
    logging.getLogger("sfs.peer").addHandler(watch)
    caplog.set_level(logging.INFO, "sfs.peer")
    try:
        result = fetch(
            bob,
            tmp_path,
            share,
            alice,
            dialer,
            [from_carol, from_alice],
            window=1,
            hello_timeout=0.3,
        )
    finally:
        logging.getLogger("sfs.peer").removeHandler(watch)
    assert set_aside.is_set(), "carol was never set aside"
    assert result.holders == ["alice"]
    assert result.path.read_bytes() == DATA


def test_a_bad_chunk_convicts_only_its_holder(
    alice: Identity,
    bob: Identity,
    carol: Identity,
    share: Share,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """carol forges every chunk after her first (sealed under the real key, so only the
    manifest shows it): she is dropped, and alice, reachable once carol's channel is
    closed, sends the rest. The file is whole; carol's forgery is reported."""
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    from_carol.forge_from = 1
    dialer = MemoryDialer(from_alice, from_carol)
    dialer.gates[from_alice.endpoint] = from_carol.closed
    caplog.set_level(logging.WARNING, "sfs.peer")
    result = fetch(bob, tmp_path, share, alice, dialer, [from_carol, from_alice], window=1)
    assert result.path.read_bytes() == DATA
    assert sorted(result.holders) == ["alice", "carol"]  # carol's first chunk was good
    # carol may be asked for more while her forgery is being checked; alice sends the rest.
    assert from_carol.chunks_sent >= 2 and from_alice.chunks_sent == CHUNKS - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One forgery is reported: the first the two workers check (chunk 1, or one asked
    # for while chunk 1 was being checked).
    assert len(warnings) == 1
    assert re.fullmatch(
        r"chunk [1-9] from carol does not match the owner's signed manifest: carol's copy may "
        r"have changed since it was shared, or be forged; the other holders sent that chunk",
        warnings[0],
    )


def test_a_bad_chunk_from_the_last_holder_keeps_the_verified_ones(
    alice: Identity, bob: Identity, share: Share, tmp_path: Path
) -> None:
    from_alice = MemoryHolder(alice, share, DATA)
    from_alice.forge_from = 4  # window 1: chunks 4 to 9
    # Chunks after 4 may be asked for while 4 is checked (a chunk's arrival frees its
    # window place), and the two workers check side by side: any forged one is named.
    with pytest.raises(DownloadInterrupted, match=r"^chunk [4-9] from alice does not match") as cut:
        fetch(bob, tmp_path, share, alice, MemoryDialer(from_alice), [from_alice], window=1)
    assert isinstance(cut.value.cause, IntegrityError)
    assert partial_of(tmp_path, share).read_bytes() == DATA[: 4 * CHUNK]

    again = MemoryHolder(alice, share, DATA)
    result = fetch(bob, tmp_path, share, alice, MemoryDialer(again), [again])
    assert (result.chunks_resumed, result.bytes_fetched) == (4, len(DATA) - 4 * CHUNK)
    assert result.path.read_bytes() == DATA


def lying_about_pages(holder: MemoryHolder) -> None:
    """`holder` serves a hash page that is not the one the owner signed (sealed under
    the real transfer key, so only the signed header shows it)."""
    real = holder.service._index_of

    def forged(share: Share) -> tuple[TreeIndex, Pages]:
        tree, pages = real(share)
        return tree, Pages(pages.entries, [bytes(len(pages.hashes[0])), *pages.hashes[1:]])

    holder.service._index_of = forged  # type: ignore[method-assign]


def test_a_holder_lying_about_the_index_is_refused_before_a_byte_is_written(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path
) -> None:
    from_carol = MemoryHolder(carol, share, DATA)
    lying_about_pages(from_carol)
    with pytest.raises(IntegrityError, match=r"^carol: hashes page 0 does not match the signed"):
        fetch(bob, tmp_path, share, alice, MemoryDialer(from_carol), [from_carol])
    assert not (tmp_path / "in").exists() or list((tmp_path / "in").iterdir()) == []
    assert from_carol.chunks_sent == 0

    # With an honest holder listed too, the index comes from it.
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    lying_about_pages(from_carol)
    dialer = MemoryDialer(from_carol, from_alice)
    result = fetch(bob, tmp_path, share, alice, dialer, [from_carol, from_alice])
    assert result.path.read_bytes() == DATA


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    """Every holder thread a download starts has ended when `fetch` returns."""
    before = {t.name for t in threading.enumerate()}
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("download-")]
    assert not [name for name in left if name not in before], left


# --- hints: direct first, then the relay --------------------------------------------------


def test_an_unreachable_holder_is_fetched_through_its_relay_hint(
    alice: Identity, bob: Identity, carol: Identity, share: Share, tmp_path: Path
) -> None:
    """alice (behind a NAT) is reached through the relay after her direct hint fails,
    with a short connect timeout; carol, reachable, is fetched directly in the same
    download; `paths` says which way each came."""
    relay = "tcp://relay.example:5602"
    from_alice, from_carol = MemoryHolder(alice, share, DATA), MemoryHolder(carol, share, DATA)
    direct = MemoryDialer(from_carol)  # alice's direct endpoint cannot be reached
    through_relay = MemoryDialer()
    through_relay.holders = {relay: from_alice}
    both_started = threading.Barrier(2, timeout=20)
    for holder in (from_alice, from_carol):  # both deliver: the download mixes the paths

        def first_waits(sent: int) -> None:
            if sent == 0:
                both_started.wait()

        holder.before_chunk = first_waits
    listed = [
        dataclasses.replace(
            from_alice.holder,
            hints=[
                protocol.ConnectionHint("direct", from_alice.endpoint),
                protocol.ConnectionHint("relay", relay, b"\x01" * 32),
            ],
        ),
        from_carol.holder,
    ]
    connector = Connector({DirectHint: direct, RelayHint: through_relay}, 60)
    downloader = Downloader(bob, PinStore(tmp_path / "pins.json"), None, window=1,
                            timeout=60, hello_timeout=60, connector=connector)  # fmt: skip
    try:
        result = downloader.fetch(
            share.file_id, lookup_of(alice, share, listed), tmp_path / "in", None
        )
    finally:
        direct.join()
        through_relay.join()
    assert result.path.read_bytes() == DATA
    assert result.paths == {"alice": relay, "carol": from_carol.endpoint}
    # The index is fetched first, on a connection of its own: the relay may be dialed twice.
    assert from_alice.endpoint in direct.dialed and set(through_relay.dialed) == {relay}


class RefusingDataDialer:
    """Records where the download opens data connections, and opens none."""

    def __init__(self) -> None:
        self.dialed: list[str] = []

    def dial(self, endpoint: str, timeout: float, interrupt: Interrupt) -> Channel:
        self.dialed.append(endpoint)
        raise TransportError(f"no answer from {endpoint}")


def test_an_offer_cannot_send_the_data_connection_to_another_host(
    alice: Identity, bob: Identity, share: Share, tmp_path: Path
) -> None:
    """A holder's offer names `tcp://10.9.8.7:6379` as its data endpoint (a service on
    the requester's own network, as an FTP bounce would): the data connection goes to the
    host the control connection reached, with only the offered port, and when it does not
    open the chunks come on the control connection."""
    from_alice = MemoryHolder(alice, share, DATA, endpoint="tcp://192.0.2.1:5601")
    from_alice.service.offer_data(["tcp://10.9.8.7:6379", "tcp://[2001:db8::7]:6380"])
    data_dialer = RefusingDataDialer()
    result = fetch(
        bob, tmp_path, share, alice, MemoryDialer(from_alice), [from_alice], data_dialer=data_dialer
    )
    assert result.path.read_bytes() == DATA
    assert data_dialer.dialed == ["tcp://192.0.2.1:6379", "tcp://192.0.2.1:6380"]
