"""The repository: every SQL statement of mfconsole, behind typed methods.

* ``schema``: the database file name, connections, ordered migrations;
* ``reads.Reads``: every query (status, the console's views, the delivery queue's
  reads), with ``DeadLetterFilter`` the one way to name dead letters;
* ``writes.Tx``: every write, inside the transaction of the one writer (the engine's
  store writer thread, or ``writes.writing`` for a command while no engine runs);
* ``states``: the delivery states.

SQLite is the first implementation. A second (PostgreSQL, so several engines can
share one queue) would provide the same ``Reads``/``Tx`` methods: claims with
``SELECT … FOR UPDATE SKIP LOCKED`` instead of the single writer, ``bytea`` for small
sealed objects, and blobs off the local disk (an object store or shared volume),
since another engine must read what this one stored (see docs/architecture.md).

Below the engine: this package imports nothing of mfconsole but itself.
"""

from mfconsole.repository.reads import AuditFilter, DeadLetterFilter, ObjectFilter, Reads, reading
from mfconsole.repository.schema import DB_NAME, SCHEMA_VERSION, SchemaError, connect, db_path, migrate
from mfconsole.repository.writes import Tx, transaction, writing

__all__ = ["AuditFilter", "DB_NAME", "ObjectFilter", "SCHEMA_VERSION", "DeadLetterFilter", "Reads", "SchemaError", "Tx", "connect",
           "db_path", "migrate", "reading", "transaction", "writing"]
