"""The repository seam: SQL lives only in mfconsole/repository, the database file is
named once, the schema is versioned by ordered migrations (old data directories are
brought up to date, newer ones refused), and the one filter names dead letters for
every caller."""

from __future__ import annotations

import ast
import re
import sqlite3
import time
from pathlib import Path

import pytest

from harness import plant

from mfconsole.repository import (DB_NAME, SCHEMA_VERSION, DeadLetterFilter, Reads, SchemaError, Tx,
                                  connect, db_path, migrate, transaction)
from mfconsole.repository.schema import MIGRATIONS, schema_version

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mfconsole"
REPOSITORY = PACKAGE / "repository"

# SQL as it is written in this project: statement keywords in capitals.
SQL = re.compile(r"\b(SELECT\b.+\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"CREATE\s+(TABLE|(UNIQUE\s+)?INDEX)|ALTER\s+TABLE|PRAGMA\s+\w+|BEGIN(\s+IMMEDIATE)?$|"
                 r"^COMMIT$|^ROLLBACK\b|SAVEPOINT\s+\w+)", re.S)


def _strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
    return out


def _product_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if REPOSITORY not in p.parents]


def test_sql_is_written_only_in_the_repository():
    found = [f"{p.relative_to(ROOT)}:{line}: {text[:60]!r}" for p in _product_files()
             for line, text in _strings(p) if SQL.search(text.strip())]
    assert not found, "SQL outside mfconsole/repository:\n" + "\n".join(found)


def test_the_sql_detector_finds_sql():
    """The check above can fail: each form it looks for is recognised."""
    for text in ("SELECT id FROM objects", "INSERT INTO audit (x) VALUES (?)",
                 "INSERT OR REPLACE INTO meta", "UPDATE deliveries SET state = ?", "DELETE FROM blob_data",
                 "CREATE TABLE x", "PRAGMA busy_timeout = 1", "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK",
                 "SAVEPOINT call", "ALTER TABLE audit ADD COLUMN actor TEXT"):
        assert SQL.search(text), text
    assert not SQL.search("select the destination from the list")


def test_only_the_repository_imports_sqlite():
    users = []
    for p in _product_files():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("sqlite3", "sqlite_utils") for n in names):
                users.append(str(p.relative_to(ROOT)))
    assert not users


def test_the_database_file_is_named_once():
    named = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
             if DB_NAME in p.read_text(encoding="utf-8")]
    assert named == ["mfconsole/repository/schema.py"]
    assert DB_NAME == "mfconsole.db"


def _sql_outside_plant(path: Path) -> list[tuple[int, str]]:
    """SQL strings of a test or bench file that are not the statement of a
    ``harness.plant`` call (the one place they may write SQL, to plant a fault), nor
    the SQL detector's own samples."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed: set[int] = set()
    for node in ast.walk(tree):
        planted = (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                   == "plant")
        detector = (isinstance(node, ast.FunctionDef) and node.name in ("test_the_sql_detector_finds_sql",
                                                                     "test_the_test_sql_check_can_fail")
                    or isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SQL" for t in node.targets))
        if planted or detector:
            allowed |= {id(n) for arg in ((node.args if planted else [node])) for n in ast.walk(arg)}
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        else:
            continue
        if SQL.search(text.strip()):
            found.append((node.lineno, text))
    return found


def test_tests_and_benches_read_through_the_repository():
    """Tests and benches read stored state through ``Reads`` and write through ``Tx``:
    SQL text only as a fault planted with harness.plant, the file named by db_path."""
    files = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")])
    found = [f"{p.relative_to(ROOT)}:{line}: {text[:60]!r}" for p in files
             for line, text in _sql_outside_plant(p)]
    assert not found, "SQL outside harness.plant:\n" + "\n".join(found)
    named = [str(p.relative_to(ROOT)) for p in files if p != Path(__file__).resolve()
             and DB_NAME in p.read_text(encoding="utf-8")]
    assert not named


def test_the_test_sql_check_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('plant(tx, "UPDATE objects SET purged_at = 1")\n'
                      'reads.conn.execute("SELECT id FROM objects")\n')
    assert [line for line, _ in _sql_outside_plant(sample)] == [2]


# -- migrations ------------------------------------------------------------------------

def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return Reads(conn).columns(table)


def test_a_new_database_gets_every_migration_in_order(tmp_path):
    conn = connect(tmp_path / "new.db")
    assert schema_version(conn) == 0
    assert migrate(conn) == (0, SCHEMA_VERSION) and SCHEMA_VERSION == len(MIGRATIONS)
    assert schema_version(conn) == SCHEMA_VERSION
    assert {"handler_digest", "suspect"} <= _columns(conn, "deliveries")
    assert "actor" in _columns(conn, "audit")
    assert {"suspect_delivery", "delivered_since_suspect"} <= _columns(conn, "destination_state")
    assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)      # nothing twice


def test_a_first_release_database_is_brought_up_to_date_keeping_its_rows(tmp_path):
    """As the first release left it: version 1 tables, one of the later columns already
    added ad hoc (versions that still said 1 did that), one delivery queued."""
    path = tmp_path / "old.db"
    conn = connect(path)
    with transaction(conn) as tx:
        MIGRATIONS[0](conn)
        MIGRATIONS[1](conn)                 # handler_digest, added ad hoc
        tx.set_meta("schema_version", "1")
        object_id = tx.insert_object({"sop_instance_uid": "1.2.3", "version": 1, "digest": "d",
                                      "blob": "x"}, None)
        plant(tx, "INSERT INTO deliveries (object_id, destination, state, retry_at) "
                  "VALUES (?, 'pacs', 'pending', 0)", (object_id,))   # no suspect column yet
    conn.close()

    conn = connect(path)
    assert migrate(conn) == (1, SCHEMA_VERSION)
    reads = Reads(conn)
    row, = reads.rows("deliveries")
    assert (row["destination"], row["state"], row["suspect"]) == ("pacs", "pending", 0)
    assert reads.meta("schema_version") == str(SCHEMA_VERSION)
    assert "objects_unpurged" in reads.indexes("objects")


def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path):
    path = tmp_path / "newer.db"
    conn = connect(path)
    migrate(conn)
    with transaction(conn) as tx:
        tx.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(SchemaError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer mfconsole.*"
                                           rf"up to {SCHEMA_VERSION}"):
        migrate(conn)
    assert Reads(conn).meta("schema_version") == str(SCHEMA_VERSION + 1)


def test_the_store_refuses_a_newer_database_with_the_reason(tmp_path):
    from mfconsole.engine.store import Store, StoreRefused
    from mfconsole.engine.vault import Vault, create_key

    conn = connect(db_path(tmp_path))
    migrate(conn)
    with transaction(conn) as tx:
        tx.set_meta("schema_version", "999")
    conn.close()
    store = Store(tmp_path, Vault([create_key(tmp_path / "store.key")]))
    with pytest.raises(StoreRefused, match="schema version 999"):
        store.open()


def test_a_failed_migration_leaves_the_database_at_its_last_version(tmp_path, monkeypatch):
    from mfconsole.repository import schema

    def broken(conn):
        plant(conn, "CREATE TABLE half_done (x)")
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + (broken,))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    conn = connect(tmp_path / "m.db")
    with pytest.raises(RuntimeError):
        schema.migrate(conn)
    assert schema_version(conn) == len(MIGRATIONS)
    assert not Reads(conn).table_exists("half_done")


# -- the one dead-letter filter ----------------------------------------------------------

@pytest.fixture
def tx(tmp_path):
    conn = connect(tmp_path / "f.db")
    migrate(conn)
    yield Tx(conn)
    conn.close()


def _dead(tx: Tx, destination: str, reason: str, uid: str, status: str = "0xA700") -> int:
    now = time.time()
    object_id = tx.insert_object({"sop_instance_uid": uid, "version": 1, "digest": "d", "blob": "f",
                                  "calling_ae": "CT1", "study_uid": "9.9"}, None)
    delivery_id, = tx.add_deliveries(object_id, "l", [(destination, None)], now)
    tx.set_outcome(delivery_id, state="dead", attempts=1, retry_at=now, status=status,
                   label="permanent/message", reason=reason, now=now)
    return delivery_id


def test_one_filter_serves_the_cli_and_the_console(tx):
    a = _dead(tx, "pacs", "Out of Resources", "1.1")
    b = _dead(tx, "pacs", "refused: SOP class", "1.2", status="0x0122")
    c = _dead(tx, "web", "HTTP 409 conflict", "1.3")
    assert tx.dead_letter_ids(DeadLetterFilter()) == [a, b, c]
    assert tx.dead_letter_ids(DeadLetterFilter(destination="pacs")) == [a, b]
    assert tx.dead_letter_ids(DeadLetterFilter(reason="out of")) == [a]
    assert tx.dead_letter_ids(DeadLetterFilter(text="0x0122")) == [b]
    assert tx.dead_letter_ids(DeadLetterFilter(text="1.3")) == [c]
    assert tx.dead_letter_ids(DeadLetterFilter(
        group={"destination": "pacs", "status": "0xA700", "reason": "Out of Resources"})) == [a]
    assert tx.dead_letter_ids(DeadLetterFilter(destination="pacs", ids=(a, c))) == [a]
    assert tx.dead_letter_count(DeadLetterFilter(destination="web")) == 1
    assert [r["id"] for r in tx.dead_letter_page(DeadLetterFilter(), before_id=c, limit=1)] == [b]
    groups = tx.dead_letter_groups(DeadLetterFilter(destination="pacs"))
    assert sorted((g["status"], g["count"]) for g in groups) == [("0x0122", 1), ("0xA700", 1)]


def test_rows_checks_names_and_matches_null(tx):
    _dead(tx, "pacs", "x", "1.1")
    assert len(tx.rows("deliveries", destination="pacs", handler=None)) == 1
    with pytest.raises(ValueError):
        tx.rows("sqlite_master")
    with pytest.raises(ValueError):
        tx.rows("deliveries", **{"state = 'dead' OR 1": 1})


# -- audit export cursor -----------------------------------------------------------------

def test_the_audit_export_cursor_only_moves_forward_and_keeps_its_last_error(tx):
    assert tx.audit_export("arr")["last_id"] == 0                       # nothing exported yet
    fields = {"sop_instance_uid": "1.2.3", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
              "study_uid": "1.2", "version": 1, "digest": "d", "blob": "b", "received_at": 1.0}
    object_id = tx.insert_object(fields, None)
    for event in ("engine_started", "stored", "delivered"):
        tx.audit(event, object_id=object_id if event != "engine_started" else None)
    rows = tx.audit_to_export(0, 10)
    assert [r["event"] for r in rows] == ["engine_started", "stored", "delivered"]
    assert rows[1]["study_uid"] == "1.2" and rows[0]["study_uid"] is None   # the object joined
    assert [r["event"] for r in tx.audit_to_export(rows[0]["id"], 1)] == ["stored"]
    tx.audit_export_failed("arr", "cannot connect to arr:6514", 5.0)
    assert tx.audit_export("arr")["last_id"] == 0                       # a failure moves nothing
    tx.audit_exported("arr", rows[2]["id"], 3, 6.0)
    tx.audit_exported("arr", rows[0]["id"], 1, 7.0)                    # never back
    state = tx.audit_export("arr")
    assert (state["last_id"], state["exported"], state["last_error"]) == (rows[2]["id"], 4, None)
    assert tx.audit_to_export(state["last_id"], 10) == []
