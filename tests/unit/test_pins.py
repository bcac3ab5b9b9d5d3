"""sfs.peer.pins: trust on first use, refusal of a changed key, explicit re-trust that
never replaces a pin unless asked to."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sfs.common.errors import StorageError, TrustError
from sfs.common.identity import KeyBundle, format_fingerprint
from sfs.peer.pins import PinConflict, PinStore


@pytest.fixture
def pins(tmp_path: Path) -> PinStore:
    return PinStore(tmp_path / "pins.json")


def test_first_use_pins_the_key(pins: PinStore, bundle: KeyBundle) -> None:
    assert pins.get("alice") is None
    assert pins.check("alice", bundle) is True
    pin = pins.get("alice")
    assert pin is not None
    assert pin.username == "alice"
    assert pin.fingerprint == bundle.fingerprint()
    assert pin.source == "first use"


def test_the_same_key_again_is_accepted_without_a_new_pin(
    pins: PinStore, bundle: KeyBundle
) -> None:
    pins.check("alice", bundle)
    assert pins.check("alice", bundle) is False
    assert pins.check("alice", KeyBundle(bundle.rsa_public, bundle.curve_public)) is False
    assert len(pins.all()) == 1


def test_a_changed_key_is_refused_with_both_fingerprints_and_the_fix(
    pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    pins.check("alice", bundle)
    with pytest.raises(TrustError) as caught:
        pins.check("alice", other_bundle)
    message = str(caught.value)
    old, new = (
        format_fingerprint(bundle.fingerprint()),
        format_fingerprint(other_bundle.fingerprint()),
    )
    assert old in message
    assert new in message
    assert message.endswith(f"sfs-peer trust alice {new} --replace")
    pin = pins.get("alice")
    assert pin is not None
    assert pin.fingerprint == bundle.fingerprint()  # the refusal changed nothing
    assert pins.check("alice", bundle) is False


def test_only_the_curve_key_changing_is_a_changed_key(pins: PinStore, bundle: KeyBundle) -> None:
    pins.check("alice", bundle)
    with pytest.raises(TrustError):
        pins.check("alice", KeyBundle(bundle.rsa_public, b"\x09" * 32))


def test_pins_are_per_user(pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle) -> None:
    assert pins.check("alice", bundle) is True
    assert pins.check("bob", other_bundle) is True
    assert [p.username for p in pins.all()] == ["alice", "bob"]
    with pytest.raises(TrustError):
        pins.check("bob", bundle)


def test_trust_refuses_to_replace_a_pin_to_another_key(
    pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    pins.check("alice", bundle)
    with pytest.raises(PinConflict) as caught:
        pins.trust("alice", other_bundle.fingerprint())
    message = str(caught.value)
    assert format_fingerprint(bundle.fingerprint()) in message
    assert format_fingerprint(other_bundle.fingerprint()) in message
    assert "(first use, " in message and message.endswith("run again with --replace")
    assert caught.value.pin == pins.get("alice")
    assert caught.value.exit_code == 4  # a TrustError
    pin = pins.get("alice")
    assert pin is not None and pin.fingerprint == bundle.fingerprint()
    assert pin.source == "first use"


def test_trust_replaces_only_the_pin_that_was_shown(
    pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    """`replace=<fingerprint>`: what a yes on the terminal replaces; if another `trust`
    changed the pin while the question was asked, the answer does not apply to it."""
    pins.check("alice", bundle)
    with pytest.raises(PinConflict):
        pins.trust("alice", other_bundle.fingerprint(), replace=b"\x01" * 32)
    assert pins.check("alice", bundle) is False
    previous = pins.trust("alice", other_bundle.fingerprint(), replace=bundle.fingerprint())
    assert previous is not None and previous.fingerprint == bundle.fingerprint()
    assert pins.check("alice", other_bundle) is False


def test_trusting_the_pinned_key_again_marks_it_checked(pins: PinStore, bundle: KeyBundle) -> None:
    pins.check("alice", bundle)
    first = pins.get("alice")
    assert first is not None
    assert pins.trust("alice", bundle.fingerprint()) == first
    again = pins.get("alice")
    assert again is not None
    assert (again.fingerprint, again.pinned_at) == (first.fingerprint, first.pinned_at)
    assert again.source == "trusted by hand"


def test_trust_replaces_the_pin(pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle) -> None:
    pins.check("alice", bundle)
    previous = pins.trust("alice", other_bundle.fingerprint(), replace=True)
    assert previous is not None and previous.fingerprint == bundle.fingerprint()
    pin = pins.get("alice")
    assert pin is not None
    assert pin.fingerprint == other_bundle.fingerprint()
    assert pin.source == "trusted by hand"
    assert pins.check("alice", other_bundle) is False
    with pytest.raises(TrustError):
        pins.check("alice", bundle)


def test_trust_before_first_use(pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle) -> None:
    assert pins.trust("carol", bundle.fingerprint()) is None
    assert pins.check("carol", bundle) is False
    with pytest.raises(TrustError):
        pins.check("carol", other_bundle)


def test_pins_persist(tmp_path: Path, bundle: KeyBundle, other_bundle: KeyBundle) -> None:
    PinStore(tmp_path / "pins.json").check("alice", bundle)
    again = PinStore(tmp_path / "pins.json")
    assert again.check("alice", bundle) is False
    with pytest.raises(TrustError):
        again.check("alice", other_bundle)


def test_the_pin_file_is_private(tmp_path: Path, bundle: KeyBundle) -> None:
    previous = os.umask(0)
    try:
        PinStore(tmp_path / "pins.json").check("alice", bundle)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "pins.json").stat().st_mode) == 0o600
    document = json.loads((tmp_path / "pins.json").read_text())
    assert document["alice"]["fingerprint"] == bundle.fingerprint().hex()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"",
        b"\xff\xfe\x00",
        b"[]",
        b"42",
        b'{"alice": 3}',
        b'{"alice": {"source": "first use", "at": 1}}',
        b'{"alice": {"fingerprint": "zz", "source": "first use", "at": 1}}',
        b'{"alice": {"fingerprint": 5, "source": "first use", "at": 1}}',
        b'{"alice": {"fingerprint": "00", "source": "first use", "at": 1, "verified_at": "yes"}}',
        b'{"alice": {"fingerprint": "00", "source": "first use", "at": 1, "verified_at": true}}',
    ],
)
def test_a_corrupt_pin_file_is_a_storage_error(
    tmp_path: Path, bundle: KeyBundle, content: bytes
) -> None:
    path = tmp_path / "pins.json"
    path.write_bytes(content)
    pins = PinStore(path)
    with pytest.raises(StorageError, match="pin file"):
        pins.check("alice", bundle)
    with pytest.raises(StorageError):
        pins.get("alice")
    with pytest.raises(StorageError):
        pins.all()
    with pytest.raises(StorageError):
        pins.trust("alice", bundle.fingerprint())
    assert path.read_bytes() == content  # not silently overwritten


def test_checking_without_pinning_leaves_no_pin(tmp_path: Path, bundle: KeyBundle) -> None:
    pins = PinStore(tmp_path / "pins.json")
    assert pins.check("alice", bundle, pin_new=False) is True
    assert pins.get("alice") is None
    assert pins.all() == []


# --- verified pins (`sfs-peer verify --confirm`) ----------------------------------------


def test_a_new_pin_is_not_verified(pins: PinStore, bundle: KeyBundle) -> None:
    pins.check("alice", bundle)
    pin = pins.get("alice")
    assert pin is not None and not pin.verified and pin.verified_at is None


def test_marking_verified_is_kept_on_disk(tmp_path: Path, bundle: KeyBundle) -> None:
    PinStore(tmp_path / "pins.json").check("alice", bundle)
    marked = PinStore(tmp_path / "pins.json").mark_verified("alice", bundle.fingerprint())
    assert marked.verified
    again = PinStore(tmp_path / "pins.json").get("alice")
    assert again is not None and again.verified_at == marked.verified_at
    assert again.fingerprint == bundle.fingerprint() and again.source == "first use"


def test_a_pin_file_from_before_verification_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text('{"alice": {"fingerprint": "00ff", "source": "first use", "at": 7}}')
    pin = PinStore(path).get("alice")
    assert pin is not None and pin.fingerprint == b"\x00\xff" and not pin.verified


def test_only_the_key_whose_code_was_compared_is_marked(
    pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    """The pin changed between showing the code and confirming it: nothing is marked."""
    pins.check("alice", other_bundle)
    with pytest.raises(TrustError, match="changed while the safety code was shown"):
        pins.mark_verified("alice", bundle.fingerprint())
    with pytest.raises(TrustError):
        pins.mark_verified("nobody", bundle.fingerprint())
    pin = pins.get("alice")
    assert pin is not None and not pin.verified
    assert pins.get("nobody") is None


def test_trusting_the_same_key_again_keeps_it_verified(pins: PinStore, bundle: KeyBundle) -> None:
    pins.check("alice", bundle)
    pins.mark_verified("alice", bundle.fingerprint())
    pins.trust("alice", bundle.fingerprint())
    pin = pins.get("alice")
    assert pin is not None and pin.verified and pin.source == "trusted by hand"


def test_replacing_the_key_drops_the_verified_mark(
    pins: PinStore, bundle: KeyBundle, other_bundle: KeyBundle
) -> None:
    pins.check("alice", bundle)
    pins.mark_verified("alice", bundle.fingerprint())
    pins.trust("alice", other_bundle.fingerprint(), replace=True)
    pin = pins.get("alice")
    assert pin is not None and pin.fingerprint == other_bundle.fingerprint()
    assert not pin.verified
