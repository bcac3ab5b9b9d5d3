"""The broker's database through the real CLI: `sfs-broker backup`, `sfs-broker migrate
--to postgresql://…` and a broker serving from PostgreSQL (a throwaway cluster)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.harness import Cluster, one_line_error

pytestmark = pytest.mark.harness


def search_names(cluster: Cluster, who: str) -> list[str]:
    hits = cluster.peers[who].run("search", "--json").check().json()["hits"]
    return sorted(hit["name"] for hit in hits)


def test_backup_migrate_and_serve_from_postgresql(postgres_url: str) -> None:
    with Cluster() as cluster:
        cluster.start_broker()
        alice = cluster.add_peer("alice")
        cluster.add_peer("bob")
        (cluster.root / "public.txt").write_text("for everyone\n")
        (cluster.root / "private.txt").write_text("for bob\n")
        alice.share(cluster.root / "public.txt", "-k", "Notes")
        alice.share(cluster.root / "private.txt", "--to", "bob")
        assert search_names(cluster, "bob") == ["private.txt", "public.txt"]

        # An online backup, taken while the broker serves; never over an existing file.
        saved = cluster.root / "saved.db"
        broker_cli = ("sfs-broker", "--config", str(cluster.broker_config))
        done = cluster.run(broker_cli[0], "backup", *broker_cli[1:], str(saved)).check()
        assert "backed up" in done.stdout
        assert (saved.stat().st_mode & 0o777) == 0o600
        again = cluster.run(broker_cli[0], "backup", *broker_cli[1:], str(saved))
        assert "exists already" in one_line_error(again)

        assert cluster.broker is not None
        cluster.broker.stop()
        moved = cluster.run(broker_cli[0], "migrate", *broker_cli[1:], "--to", postgres_url)
        moved.check()
        assert "2 users" in moved.stdout and "2 files" in moved.stdout
        assert "verified" in moved.stdout
        refused = cluster.run(broker_cli[0], "migrate", *broker_cli[1:], "--to", postgres_url)
        assert "already holds an sfs index" in one_line_error(refused)

        # The same broker on PostgreSQL: sessions, passwords, keys, files and access
        # lists came along, and new users are numbered after the copied ones.
        cluster.start_broker(database=postgres_url)
        assert search_names(cluster, "bob") == ["private.txt", "public.txt"]
        cluster.peers["alice"].run("login", "--password-stdin", input="alice-password\n").check()
        carol = cluster.add_peer("carol")
        assert search_names(cluster, "carol") == ["public.txt"]
        carol.share(cluster.root / "public.txt")
        # What was acknowledged survives the broker's SIGKILL: it is in the database.
        assert cluster.broker is not None
        cluster.broker.stop(signal.SIGKILL)
        cluster.start_broker(database=postgres_url)
        status = cluster.broker_status()
        assert [u["username"] for u in status["users"]] == ["alice", "bob", "carol"]
        assert status["files"] == 3
        assert search_names(cluster, "carol") == ["public.txt", "public.txt"]

        # Restore the SQLite backup: the index as it was when it was taken.
        assert cluster.broker is not None
        cluster.broker.stop()
        data = cluster.root / "broker"
        for leftover in data.glob("broker.db*"):
            leftover.unlink()
        shutil.copy(saved, data / "broker.db")
        cluster.start_broker()
        status = cluster.broker_status()
        assert [u["username"] for u in status["users"]] == ["alice", "bob"]
        assert search_names(cluster, "bob") == ["private.txt", "public.txt"]
        pg_backup = cluster.run(
            "sfs-broker", "backup", "--config", str(write_pg_config(cluster, postgres_url)), "x"
        )
        assert "pg_dump" in one_line_error(pg_backup)


def write_pg_config(cluster: Cluster, url: str) -> Path:
    config = cluster.root / "pg-broker.yaml"
    config.write_text(f"bind: tcp://127.0.0.1:1\ndata_dir: broker\ndatabase: {url}\n")
    return config


def test_database_errors_are_one_line_and_never_show_the_password(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.start_broker()
        assert cluster.broker is not None
        cluster.broker.stop()
        secret = "s3cret-pw"
        unreachable = f"postgresql://sfs:{secret}@127.0.0.1:1/sfs"
        failed = cluster.run(
            "sfs-broker", "migrate", "--config", str(cluster.broker_config), "--to", unreachable
        )
        line = one_line_error(failed)
        assert "postgresql://sfs@127.0.0.1:1/sfs" in line and secret not in failed.stderr

        # A password in a config file others can read is refused, naming the key only.
        config = write_pg_config(cluster, unreachable)
        config.chmod(0o644)
        refused = cluster.run("sfs-broker", "status", "--config", str(config))
        line = one_line_error(refused)
        assert "database" in line and "chmod 600" in line and secret not in refused.stderr
        config.chmod(0o600)  # then it is used, and the unreachable server is the error
        line = one_line_error(cluster.run("sfs-broker", "status", "--config", str(config)))
        assert "cannot set up the database postgresql://sfs@127.0.0.1:1/sfs" in line
        assert secret not in line
