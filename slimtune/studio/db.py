"""SQLite persistence for the Studio: models, datasets, runs and exports survive server restarts.

One connection is shared by the server's threads behind a lock; SQLite calls are short (rows, not blobs),
so the lock is never held for long. Metrics stay in each run's ``metrics.jsonl``; the database only
stores where they are.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

# Job states shared by runs and exports. 'interrupted' means the server stopped while the job ran.
QUEUED, RUNNING, COMPLETED, FAILED, STOPPED, INTERRUPTED = (
    "queued", "running", "completed", "failed", "stopped", "interrupted",
)
ACTIVE_STATES = (QUEUED, RUNNING)
FINISHED_STATES = (COMPLETED, FAILED, STOPPED, INTERRUPTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, ref TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, filename TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, model_id TEXT NOT NULL,
    model_ref TEXT NOT NULL, dataset_id TEXT NOT NULL, config_json TEXT NOT NULL, run_dir TEXT NOT NULL,
    log_path TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, exit_code INTEGER,
    error TEXT, resume_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS exports (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, format TEXT NOT NULL, status TEXT NOT NULL,
    out_dir TEXT NOT NULL, zip_path TEXT, log_path TEXT NOT NULL, error TEXT, exit_code INTEGER,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL
);
"""
_TABLES = ("models", "datasets", "runs", "exports")
_COLUMNS: dict[str, tuple[str, ...]] = {}


class Store:
    """Thread-safe access to the Studio database (one file under the data directory)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            for table in _TABLES:
                cols = tuple(r["name"] for r in self._conn.execute(f"PRAGMA table_info({table})"))
                _COLUMNS[table] = cols

    def close(self) -> None:
        """Close the connection (the server does this on shutdown)."""
        with self._lock:
            self._conn.close()

    def _check(self, table: str, fields: dict[str, Any]) -> None:
        # Table and column names are interpolated into SQL, so only known ones may pass.
        if table not in _TABLES:
            raise ValueError(f"unknown table {table!r}")
        unknown = set(fields) - set(_COLUMNS[table])
        if unknown:
            raise ValueError(f"unknown columns for {table}: {sorted(unknown)}")

    def insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """Insert one row and return it as stored."""
        self._check(table, row)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))
        return self.get(table, row["id"]) or {}

    def update(self, table: str, row_id: str, **fields: Any) -> None:
        """Set some columns of one row."""
        if not fields:
            return
        self._check(table, fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*fields.values(), row_id))

    def get(self, table: str, row_id: str) -> dict[str, Any] | None:
        """One row by id, or None."""
        self._check(table, {})
        with self._lock:
            r = self._conn.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone()
        return dict(r) if r else None

    def list(self, table: str, *, where: dict[str, Any] | None = None, newest_first: bool = True) -> list[dict]:
        """All rows of a table (optionally filtered by equality), ordered by creation time."""
        where = where or {}
        self._check(table, where)
        clause = (" WHERE " + " AND ".join(f"{k} = ?" for k in where)) if where else ""
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM {table}{clause} ORDER BY created_at {order}", tuple(where.values())
            ).fetchall()
        return [dict(r) for r in rows]

    def delete(self, table: str, row_id: str) -> None:
        """Remove one row."""
        self._check(table, {})
        with self._lock:
            self._conn.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))

    def recover_after_restart(self) -> list[tuple[str, str]]:
        """Mark jobs that were running when the last server stopped as interrupted.

        Returns:
            ``(table, id)`` of jobs still queued, oldest first, so the caller can queue them again.
        """
        now = time.time()
        requeue: list[tuple[float, str, str]] = []
        for table in ("runs", "exports"):
            for row in self.list(table, where={"status": RUNNING}):
                self.update(
                    table, row["id"], status=INTERRUPTED, finished_at=now,
                    error="The Studio server stopped while this job was running.",
                )
            requeue += [(r["created_at"], table, r["id"]) for r in self.list(table, where={"status": QUEUED})]
        return [(table, row_id) for _, table, row_id in sorted(requeue)]


def dumps(obj: Any) -> str:
    """Compact JSON for config columns."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
