"""The one way the app opens its local SQLite databases (outbox, pseudonym map, inbox)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_wal_database(path: Path) -> sqlite3.Connection:
    """A connection shared by the app's threads (callers serialise with their own lock), in WAL mode
    so a reader never blocks the writer and a crash mid-write leaves the last commit intact."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Owner-only from the start (they hold patient identities); SQLite gives its -wal and -shm files the same mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    return db
