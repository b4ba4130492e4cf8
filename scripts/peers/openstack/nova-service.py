"""Runs one Nova service of the test stack (api, conductor, scheduler or compute), with one
change to how it sees its sqlite database: "database is locked" is reported to Nova as a
deadlock (oslo.db's DBDeadlock).

Why: Nova's database writes are wrapped in oslo.db's retry-on-deadlock, which is what makes
concurrent writers safe on MySQL. On sqlite (WAL) a writer whose read snapshot went stale gets
SQLITE_BUSY at once, whatever the busy timeout, and oslo.db passes it on as a plain
OperationalError: Nova then fails the build or the delete it was doing and sets the server to
ERROR ("Failed to allocate the network(s)"), more often the busier the machine. As a deadlock, the
same conflict is retried as on MySQL.

Usage: nova-service.py SERVICE [nova options...]
"""

import importlib
import sys

# nova.cmd monkey-patches eventlet on import: it comes before anything else is imported.
importlib.import_module("nova.cmd")

from oslo_db import exception as db_exc  # noqa: E402
from oslo_db.sqlalchemy import exc_filters  # noqa: E402
from sqlalchemy import exc as sqla_exc  # noqa: E402


@exc_filters.filters("sqlite", sqla_exc.OperationalError, r".*database is locked.*")
def _locked_is_a_deadlock(operational_error, match, engine_name, is_disconnect):
    raise db_exc.DBDeadlock(operational_error)


def main():
    service = sys.argv[1]
    sys.argv = ["nova-" + service] + sys.argv[2:]
    return importlib.import_module("nova.cmd." + service).main()


if __name__ == "__main__":
    sys.exit(main())
