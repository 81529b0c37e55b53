#!/bin/sh
"""exec" python3 -c '
# Run as a command (installed by copying, as README shows), this file starts as
# a shell script: sh reads this line only and execs Python on the byte-compiled
# copy of the file kept in ~/.cache/queuectl, so a call does not compile 6,000
# lines again (design.md, "Start-up"). To Python the same lines are a string.
import os, sys
path = sys.argv.pop(1)
sys.argv[0] = path
sys.path[0] = os.path.dirname(os.path.realpath(path))
cache = os.path.realpath(os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "queuectl"))
def trusted(d):
    # No other user may write where our bytecode lives, nor above it.
    uid = os.geteuid()
    while True:
        st = os.lstat(d)
        if st.st_uid not in (0, uid) or st.st_mode & 0o022 and not st.st_mode & 0o1000:
            return False
        if os.path.dirname(d) == d:
            return True
        d = os.path.dirname(d)
try:
    os.makedirs(cache, 0o700, exist_ok=True)
    ok = os.stat(cache).st_uid == os.geteuid() and trusted(cache)
except OSError:
    ok = False
from importlib.machinery import SourceFileLoader
loader = SourceFileLoader("queuectl", path)
try:
    # Only for this file: the modules it imports keep their own caches.
    sys.pycache_prefix, sys.dont_write_bytecode = (cache, False) if ok else (None, True)
    code = loader.get_code("queuectl")
except (ValueError, EOFError, TypeError):     # a damaged cached copy
    code = compile(loader.get_data(path), path, "exec")
finally:
    sys.pycache_prefix, sys.dont_write_bytecode = None, False
module = type(sys)("queuectl")
module.__file__ = path
sys.modules["queuectl"] = module
exec(code, module.__dict__)
module.main_and_exit()
' "$0" "$@"
"""
# The string above is this module's docstring only by position; this is the real one.
__doc__ = """queuectl: a background job queue for shell commands, in one file.

Jobs are shell commands kept in a SQLite file. Workers claim them, run them,
retry failures with exponential backoff and move jobs that keep failing to a
dead letter queue (DLQ)::

    $ queuectl enqueue -- 'tar czf /backup/home.tgz /home'
    m3x1k2q90001
    $ queuectl worker start --once
    10:00:00 w1 m3x1k2q90001 claimed (attempt 1/4): tar czf /backup/home.tgz /home
    10:00:02 w1 m3x1k2q90001 completed in 2.01s
    $ queuectl wait m3x1k2q90001 && echo done
    done

Standard library only, Python 3.8+. See README.md for usage and design.md for
the schema, the claim/lease protocol and the failure modes.
"""

__version__ = "0.1.0"

import contextlib
import functools      # loaded by contextlib anyway
import os
import sqlite3
import sys
import time

# Heavy or worker-only modules (argparse, json, subprocess, selectors, signal,
# multiprocessing, datetime) are imported where they are used: `enqueue` is run
# from shell loops and cron, so start-up time is part of the product.


###############################################################################
# Constants and schema #######################################################
###############################################################################

#: The five job states, in the order a job usually moves through them.
STATES = ("pending", "processing", "completed", "failed", "dead")
#: States a worker may claim from (when the job's run_at has passed).
DUE_STATES = ("pending", "failed")

#: The queue of a job enqueued without one; workers serve every queue unless told.
DEFAULT_QUEUE = "default"

#: Environment variable naming the database file.
DB_ENV = "QUEUECTL_DB"

#: Configuration keys, their defaults and their meaning (stored in the database).
CONFIG_DEFAULTS = {
    "max_retries": 3,        # retries after the first run; N retries = N+1 runs
    "backoff_base": 2.0,     # a retry waits backoff_base ** k seconds after failed run k
    "backoff_max": 3600.0,   # ... but never longer than this
    "timeout": None,         # default per-job timeout in seconds (None: no timeout)
    "retention": None,       # workers delete completed jobs older than this (None: keep)
}
CONFIG_HELP = {
    "max_retries": "retries after the first failed run (integer >= 0)",
    "backoff_base": "retry k waits backoff_base ** k seconds (number >= 1)",
    "backoff_max": "upper bound of a retry delay (duration, e.g. 3600 or 1h)",
    "timeout": "default job timeout (duration > 0, or 'none')",
    "retention": "workers delete completed jobs older than this (duration > 0, or 'none'); never dead ones",
}
#: Earlier designs' names of settings, accepted as they were (README: Aliases).
CONFIG_ALIASES = {"max_backoff_seconds": "backoff_max", "job_time_out_seconds": "timeout",
                  "job_timeout": "timeout"}
#: Settings whose 'none' means "no limit". Zero, in any spelling, is refused
#: for them (as for a job's timeout): `retention 0` read as "keep nothing"
#: by some and as "keep forever" by others.
NONE_MEANS = {"timeout": "no timeout", "retention": "keep completed jobs forever"}

#: `worker start --count` above the larger of these needs --force: each worker
#: is a process of its own, and a count with one zero too many forked
#: thousands of them before running out of file descriptors.
MAX_WORKERS, MAX_WORKERS_PER_CPU = 256, 32
#: File descriptors the supervisor holds per worker (multiprocessing's two
#: pipes; a forked worker inherits its elder siblings'), and besides them.
FDS_PER_WORKER, SUPERVISOR_FDS = 2, 32
#: A claim is a lease for this long; the worker renews it while the job runs.
LEASE_SECONDS = 30.0
#: How often a worker renews its lease and checks for stop/cancel requests.
HEARTBEAT_SECONDS = 2.0
#: A worker not heard of for this long is removed from the workers table.
FORGET_WORKER_SECONDS = 600.0
#: A worker whose heartbeats have failed this long (cut off from the database)
#: kills its job: with KILL_GRACE_SECONDS to die and a margin for a last
#: heartbeat in flight, the run is over before its LEASE_SECONDS lease
#: expires and another worker, maybe on another host, takes the job back.
LEASE_GIVE_UP_SECONDS = 15.0
#: How long a heartbeat waits for the write lock before trying again later.
HEARTBEAT_BUSY_MS = 200
#: After SIGTERM to a job's process group, SIGKILL follows after this long.
KILL_GRACE_SECONDS = 5.0
#: After a job's shell exits, how long to keep reading output that leftover
#: processes in its group still write, before they are killed.
EXIT_GRACE_SECONDS = 0.5
#: Captured bytes kept per stream and run: the first and last half of this.
OUTPUT_LIMIT = 1024 * 1024
#: A running job's output is written for `logs --follow` this often (a job that
#: ends sooner writes none), and at most this much of it is kept per run; a
#: worker holds at most LIVE_BUFFER_LIMIT of it in memory between two writes.
LIVE_OUTPUT_SECONDS = 0.5
#: ... and sooner, once half of LIVE_BUFFER_LIMIT waits, but not more often
#: than this: a follower keeping up sees all of up to ~2.5 MB/s, and however
#: fast a job prints, the worker writes no more than that for followers.
LIVE_OUTPUT_SOONEST = 0.1
LIVE_OUTPUT_LIMIT = 1024 * 1024
LIVE_BUFFER_LIMIT = 256 * 1024
#: How long a command waits for another process's write lock before failing
#: (QUEUECTL_BUSY_TIMEOUT overrides it).
BUSY_TIMEOUT_SECONDS = 30.0
#: The longest command /bin/sh -c can be given on Linux (MAX_ARG_STRLEN - 1).
MAX_COMMAND_BYTES = 131071
#: Jobs deleted per transaction by `purge` and by the retention sweep, so
#: that workers never wait long for the write lock.
PURGE_BATCH = 500
#: How often a worker applies the `retention` setting.
RETENTION_EVERY_SECONDS = 60.0
#: The WAL file is truncated back to this size after a checkpoint; a worker
#: that finds it bigger after a job forces a checkpoint that truncates it.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: File systems on which SQLite's WAL locking does not work across hosts.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
                       "lustre", "gpfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "davfs")
#: An idle worker sleeps until a commit nudges it (see WakeFifo). Where it
#: cannot be nudged (no FIFO could be made beside the database), it polls a
#: cheap counter instead: every 2 ms at first, backing off to every 25 ms.
IDLE_POLL_SECONDS = (0.002, 0.025)
#: An idle worker that commits nudge (see WakeFifo; LISTEN on PostgreSQL)
#: wakes when the next waiting job falls due, and otherwise re-runs the due
#: check this often, with its heartbeat: the safety net for a nudge that was
#: lost (a writer killed between commit and nudge, an older queuectl that does
#: not nudge). One that no commit can nudge (QUEUECTL_PG_LISTEN=0) checks every
#: IDLE_CLAIM_SECONDS.
IDLE_RECHECK_SECONDS = 2.0
IDLE_CLAIM_SECONDS = 0.5
#: Suffix of the FIFO beside the database through which commits wake idle workers.
WAKE_SUFFIX = "-wake"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124         # as timeout(1): `wait` or `worker stop` gave up
EXIT_INTERRUPTED = 130
#: A worker process's exit status (to its supervisor only) when a SIGTERM sent
#: to it alone stopped it: the pool goes on, with a new worker in its place.
EXIT_WORKER_TERMINATED = 3
#: workers.stop_requested bits: `worker stop` asked; the worker is stopping
#: for a reason of its own (a signal, its supervisor gone). Shown as stopping.
STOP_ASKED, STOP_SELF = 1, 2

#: Schema version, kept in PRAGMA user_version. MIGRATIONS[v] upgrades v -> v+1.
SCHEMA_VERSION = 4

# Parts of the version-4 schema that the 3 -> 4 migration creates too: one
# text for both. Frozen with version 4 (a version 5 changes SCHEMA and adds a
# migration; it never edits these, or the 3 -> 4 migration would change).
_V4_JOB_INDEXES = """
-- The claim reads the head of jobs_ready for each queue it may take from;
-- it holds only jobs that are due and not blocked. Waiting jobs (not yet
-- due) sit in jobs_waiting, ordered by due time, until a claim promotes them
-- (ready = 1) in its own transaction; blocked ones are in neither.
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, seq)
    WHERE ready = 1;
CREATE INDEX jobs_waiting ON jobs (run_at)
    WHERE ready = 0 AND blocked = 0 AND state IN ('pending', 'failed');
CREATE INDEX jobs_running ON jobs (queue)
    WHERE state = 'processing';
CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('pending', 'failed', 'processing');
"""
_V4_TABLES = """
-- Every queue that has (had) jobs or settings. max_running: the most jobs of
-- the queue processing at once, across every pool and host (NULL: no limit).
CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    max_running INTEGER,
    paused      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO queues (name) VALUES ('default');

-- job_id runs only after after_id has completed.
CREATE TABLE deps (
    job_id   TEXT NOT NULL,
    after_id TEXT NOT NULL,
    PRIMARY KEY (job_id, after_id)
);
CREATE INDEX deps_after ON deps (after_id);

-- A running job's output as it comes, for `logs --follow`: chunks in arrival
-- order, at most LIVE_OUTPUT_LIMIT bytes a run, deleted when the run ends
-- (its head and tail are then in runs.stdout/stderr).
CREATE TABLE output (
    id     INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    run    INTEGER NOT NULL,
    stream INTEGER NOT NULL,            -- 1 stdout, 2 stderr
    pos    INTEGER NOT NULL,            -- bytes of this stream before this chunk
    data   BLOB NOT NULL
);
CREATE INDEX output_run ON output (job_id, run, id);
"""
_V4_COUNT_TRIGGERS = """
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
    UPDATE counts SET n = n + 1 WHERE queue = NEW.queue AND state = NEW.state;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
END;
"""

SCHEMA = """
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,   -- enqueue order
    id               TEXT NOT NULL UNIQUE,
    command          TEXT NOT NULL,
    cwd              TEXT NOT NULL,
    state            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,  -- runs started (and counted)
    max_retries      INTEGER NOT NULL,
    timeout          REAL,                         -- seconds; NULL: none
    run_at           REAL NOT NULL,                -- due time (retry time when failed)
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    exit_code        INTEGER,                      -- last run's
    outcome          TEXT,                         -- last run's, or 'cancelled'
    run_count        INTEGER NOT NULL DEFAULT 0,   -- runs started, ever (numbers runs)
    worker_id        TEXT,                         -- lease holder while processing
    lease_until      REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    ready            INTEGER NOT NULL DEFAULT 0,   -- 1: pending/failed, due, not blocked
    queue            TEXT NOT NULL DEFAULT 'default',
    blocked          INTEGER NOT NULL DEFAULT 0,   -- dependencies not completed yet
    unique_key       TEXT,                         -- at most one active job per key
    env              TEXT                          -- JSON object: extra environment variables
);
CREATE INDEX jobs_state ON jobs (state, seq);
""" + _V4_JOB_INDEXES + """

""" + _V4_TABLES + """
CREATE TABLE runs (
    job_id       TEXT NOT NULL,
    run          INTEGER NOT NULL,      -- 1, 2, ... in the order runs started
    attempt      INTEGER NOT NULL,      -- the job's attempt number for this run
    worker_id    TEXT NOT NULL,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    exit_code    INTEGER,
    outcome      TEXT,                  -- 'exit 0', 'exit 3', 'timeout', 'worker lost', ...
    result_state TEXT,                  -- the job's state after this run
    stdout       BLOB,
    stderr       BLOB,
    PRIMARY KEY (job_id, run)
);
CREATE INDEX runs_finished ON runs (finished_at);

CREATE TABLE workers (
    id             TEXT PRIMARY KEY,    -- host:pid:start
    host           TEXT NOT NULL,
    boot_id        TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    pid_start      INTEGER,
    started_at     REAL NOT NULL,
    heartbeat_at   REAL NOT NULL,
    stop_requested INTEGER NOT NULL DEFAULT 0   -- bits: STOP_ASKED | STOP_SELF
);

CREATE TABLE config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                 -- JSON
);

-- Per-queue, per-state job counts, so that `status` and `queue list` cost the
-- same with a thousand jobs or a million. Triggers keep them on UPDATE and
-- DELETE; Store.enqueue, the only INSERT, adds its rows itself (a per-row
-- trigger tripled its cost) and the five rows of a new queue.
CREATE TABLE counts (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
);
INSERT INTO counts (queue, state, n) VALUES ('default', 'pending', 0), ('default', 'processing', 0),
    ('default', 'completed', 0), ('default', 'failed', 0), ('default', 'dead', 0);

""" + _V4_COUNT_TRIGGERS

#: MIGRATIONS[v] is the script that upgrades a version-v database to v+1. Each
#: runs inside the one transaction that opens the file; SQLite 3.22 has no
#: DROP COLUMN, so columns that fell out of use stay (and are never read).
MIGRATIONS = {
    # 1 -> 2: runs are numbered from a counter on the job (no MAX(run) per
    # claim); the per-run pgid columns and workers.job_id are no longer used.
    1: """
        ALTER TABLE jobs ADD COLUMN run_count INTEGER NOT NULL DEFAULT 0;
        UPDATE jobs SET run_count = (SELECT COALESCE(MAX(run), 0) FROM runs WHERE runs.job_id = jobs.id);
        DROP TRIGGER jobs_count_insert;
    """,
    # 2 -> 3: waiting jobs are staged apart from claimable ones (issue 13).
    # Every job starts not ready; the first claim promotes those already due.
    2: """
        ALTER TABLE jobs ADD COLUMN ready INTEGER NOT NULL DEFAULT 0;
        DROP INDEX jobs_due;
        CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)
            WHERE ready = 1;
        CREATE INDEX jobs_waiting ON jobs (run_at)
            WHERE ready = 0 AND state IN ('pending', 'failed');
    """,
    # 3 -> 4: named queues with limits and pause, dependencies, unique keys,
    # per-job environment, live output (issue 9). Counts become per queue.
    3: """
        ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
        ALTER TABLE jobs ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN unique_key TEXT;
        ALTER TABLE jobs ADD COLUMN env TEXT;
        DROP INDEX jobs_ready;
        DROP INDEX jobs_waiting;
    """ + _V4_JOB_INDEXES + _V4_TABLES + """
        DROP TRIGGER jobs_count_update;
        DROP TRIGGER jobs_count_delete;
        CREATE TABLE queue_counts (
            queue TEXT NOT NULL,
            state TEXT NOT NULL,
            n     INTEGER NOT NULL,
            PRIMARY KEY (queue, state)
        );
        INSERT INTO queue_counts (queue, state, n) SELECT 'default', state, n FROM counts;
        DROP TABLE counts;
        ALTER TABLE queue_counts RENAME TO counts;
    """ + _V4_COUNT_TRIGGERS + """
    """,
}


###############################################################################
# Errors ######################################################################
###############################################################################

class QueueError(Exception):
    """A problem the user can fix; `main` prints it as one line and exits 1."""

    exit_code = EXIT_ERROR


class UsageError(QueueError):
    """Bad command-line usage (exit 2)."""

    exit_code = EXIT_USAGE


class JobNotFound(QueueError):
    def __init__(self, job_id, missing_db=None):
        super().__init__("job %r not found%s" % (job_id, "" if missing_db is None else
                                                 " (there is no database at %s)" % missing_db))


class StoreError(QueueError):
    """The database could not be opened, read or written."""


class _Conflict(StoreError):
    """PostgreSQL gave up a transaction (deadlock, serialization failure):
    the whole transaction is run again."""


class _Collision(Exception):
    """A generated job id was taken meanwhile: the enqueue is run again."""


###############################################################################
# Helpers: parsing and formatting times, durations, text ######################
###############################################################################

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """Seconds from a number or a string like '30', '1.5', '30s', '10m', '2h', '1d'."""
    if isinstance(text, bool):
        raise ValueError("expected a duration, not a boolean")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower()
        unit = s[-1:] if s[-1:] in _DURATION_UNITS else ""
        number = s[:-1] if unit else s
        try:
            value = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise ValueError("invalid duration %r (use seconds or e.g. 30s, 10m, 2h, 1d)" % (text,))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("invalid duration %r" % (text,))
    if value < 0:
        raise ValueError("duration must not be negative: %r" % (text,))
    if value > 100 * 365 * 86400:
        raise ValueError("duration too large: %r" % (text,))
    return value


_ISO_TIME = None
#: The first and last millisecond of UTC years 0001 to 9999, as epoch milliseconds.
_FIRST_MS, _LAST_MS = -62135596800000, 253402300799999


def parse_time(text):
    """Epoch seconds from an ISO-8601 string; without an offset it is local time.

    Parsed here rather than by datetime.fromisoformat, which accepts fewer
    forms before Python 3.11: a job file must mean the same on every server.
    """
    global _ISO_TIME
    import datetime
    import re
    if _ISO_TIME is None:
        _ISO_TIME = re.compile(r"""
            (\d{4})-?(\d{2})-?(\d{2})
            (?:[T ](\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d+))?)?)?)?
            \s*(Z|[+-]\d{2}(?::?\d{2})?)?""", re.VERBOSE | re.IGNORECASE)
    bad = ValueError("invalid time %r (use ISO-8601, e.g. 2026-01-31T14:00:00 or ...+02:00)" % (text,))
    if not isinstance(text, str):
        raise ValueError("expected an ISO-8601 time string, not %s" % _json_type(text))
    m = _ISO_TIME.fullmatch(text.strip())
    if not m:
        raise bad
    year, month, day, hour, minute, second, fraction, offset = m.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    tz = None
    if offset:
        if offset.upper() == "Z":
            tz = datetime.timezone.utc
        else:
            digits = offset[1:].replace(":", "")
            if int(digits[:2]) >= 24 or int(digits[2:] or 0) >= 60:
                raise bad
            delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            tz = datetime.timezone(-delta if offset[0] == "-" else delta)
    try:
        dt = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                               int(second or 0), micro, tzinfo=tz)
        ts = dt.timestamp()     # naive datetimes are taken as local time
    except (OverflowError, OSError, ValueError):
        raise ValueError("time out of range: %r" % (text,))
    # Only times that format_time can write in four-digit years, so that what
    # --json prints parses again (9999-12-31T23:59:59-05:00 is in year 10000 UTC).
    if not _FIRST_MS <= round(ts * 1000) <= _LAST_MS:
        raise ValueError("time out of range: %r (UTC years 0001 to 9999)" % (text,))
    return ts


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def backoff_delay(failures, base, cap):
    """Seconds to wait after the `failures`-th failed run: min(base ** failures, cap)."""
    try:
        return min(float(base) ** failures, float(cap))
    except OverflowError:
        return float(cap)


def format_time(ts):
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-23T10:00:00.123Z (None stays None)."""
    if ts is None:
        return None
    ms = int(round(ts * 1000))
    secs, ms = divmod(ms, 1000)
    # Not strftime: glibc writes year 1 as "1", not "0001".
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (time.gmtime(secs)[:6] + (ms,))


def format_local(ts):
    """Local time for humans: 'YYYY-MM-DD HH:MM:SS' ('-' for None)."""
    if ts is None:
        return "-"
    return "%04d-%02d-%02d %02d:%02d:%02d" % time.localtime(ts)[:6]


def format_seconds(secs):
    if secs is None:
        return "-"
    if secs < 60:
        return "%.2fs" % secs
    if secs < 3600:
        return "%dm%02ds" % divmod(int(secs), 60)
    return "%dh%02dm" % divmod(int(secs) // 60, 60)


def printable(value):
    """Text safe for a terminal: control characters are shown escaped."""
    s = "" if value is None else str(value)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


###############################################################################
# Helpers: database location and file system ##################################
###############################################################################

def default_db_path(environ=None):
    """$QUEUECTL_DB, else $XDG_DATA_HOME/queuectl/queue.db (~/.local/share/...)."""
    environ = os.environ if environ is None else environ
    if environ.get(DB_ENV):
        return environ[DB_ENV]
    data_home = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "queuectl", "queue.db")


def is_postgres_url(path):
    """Does --db / $QUEUECTL_DB name a PostgreSQL database rather than a file?"""
    return path.startswith(("postgresql://", "postgres://"))


#: The password of a URL's user part: up to the last "@", as far as anything
#: might read it (libpq reads "s3cret?pw@host" as a password with a "?").
_URL_PASSWORD = r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):(.*)@"


def redact_url(url, mask="***"):
    """The URL with its password (in the user part or a password= parameter)
    replaced by `mask`: what every message, log line and `status` shows. With
    mask None the password is left out altogether."""
    import re
    if mask is None:
        url = re.sub(_URL_PASSWORD, r"\1@", url)
        return re.sub(r"([?&])password=[^&#]*&?", r"\1", url).rstrip("?&")
    url = re.sub(_URL_PASSWORD, lambda m: "%s:%s@" % (m.group(1), mask), url)
    return re.sub(r"([?&]password=)[^&#]*", lambda m: m.group(1) + mask, url)


def url_secrets(url):
    """The password(s) a URL holds, as written and percent-decoded, longest
    first: what must be cut out of any text (a driver's error may quote them)."""
    import re
    import urllib.parse
    found = set()
    m = re.match(_URL_PASSWORD, url)
    raws = ([m.group(2)] if m else []) + re.findall(r"[?&]password=([^&#]*)", url)
    if m and "/" in m.group(2):
        # libpq reads "user:pa/ss@host" as host "user", port "pa", and may quote either part.
        raws += [piece for piece in m.group(2).replace("@", "/").split("/") if len(piece) >= 3]
    for raw in raws:
        if raw:
            found.add(raw)
            found.add(urllib.parse.unquote(raw))
    return sorted(found, key=len, reverse=True)


def check_db_location(path):
    """Refuse a --db that looks like a URL but is not a postgresql:// one (a
    typo would otherwise make a SQLite file named after it, password and all)."""
    import re
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", path)
    if is_postgres_url(path) or not scheme:
        return
    name = scheme.group(1)
    if name.lower() in ("postgres", "postgresql"):
        raise StoreError("malformed PostgreSQL URL %s: it must start with postgresql:// (or postgres://), "
                         "in lower case" % redact_url(path))
    if path[scheme.end():].startswith("//"):
        raise StoreError("unsupported database URL %s: --db takes a SQLite file path or a postgresql:// URL"
                         % redact_url(path))


def db_display(path):
    """The database as messages show it: a file's path, or the URL without its password."""
    return redact_url(path) if is_postgres_url(path) else path


def db_mark(path):
    """The database as a job's QUEUECTL_DB names it (and its leftover
    processes are found by): the file's real path, or the URL without its
    password (a job that enqueues more finds it in ~/.pgpass or $PGPASSWORD;
    a password in the URL, even ***, would win over both)."""
    return redact_url(path, mask=None) if is_postgres_url(path) else os.path.realpath(path)


def busy_timeout_setting(environ=None):
    """Seconds to wait for a lock: $QUEUECTL_BUSY_TIMEOUT, else BUSY_TIMEOUT_SECONDS."""
    environ = os.environ if environ is None else environ
    text = environ.get("QUEUECTL_BUSY_TIMEOUT")
    if not text:
        return BUSY_TIMEOUT_SECONDS
    try:
        return parse_duration(text)
    except ValueError as e:
        raise QueueError("QUEUECTL_BUSY_TIMEOUT: %s" % e)


def _mount_fstype(path, mountinfo=None):
    """The file system type of the mount holding `path` (Linux), or None."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                mountinfo = f.read().decode("utf-8", "replace")
        except OSError:
            return None
    lines = mountinfo.splitlines()
    path = os.path.realpath(path)
    best, fstype = -1, None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, fstype = len(mount), right.split()[0]
    return fstype


def check_filesystem(directory, mountinfo=None):
    """Refuse a network file system: SQLite's WAL needs shared memory on one
    host, so two hosts would corrupt the queue. QUEUECTL_ALLOW_NETWORK_FS=1
    overrides (for one host using a network disk alone)."""
    if os.environ.get("QUEUECTL_ALLOW_NETWORK_FS") == "1":
        return
    fstype = _mount_fstype(directory, mountinfo)
    if fstype and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs")):
        raise StoreError("refusing database in %s: it is on a network file system (%s), where SQLite's "
                         "WAL locking is unsafe; use a local disk (or set QUEUECTL_ALLOW_NETWORK_FS=1 "
                         "if only this host uses it)" % (directory, fstype))


def make_private_dirs(directory):
    """Create `directory` and every missing parent, each 0700 (os.makedirs
    gives its mode only to the last one)."""
    missing = []
    while not os.path.lexists(directory) and os.path.dirname(directory) != directory:
        missing.append(directory)
        directory = os.path.dirname(directory)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass    # another process made it first; checked when the file is opened


def _refuse_unless_private(path, st, what, owners):
    """Raise StoreError unless `st` (of the database, its directory or a
    -wal/-shm file) is owned by one of `owners` and writable by no one else:
    a file or directory that another user can write lets them read the jobs
    and make the worker run their commands as us."""
    import stat
    fix = "chmod go-w %s" % path
    writers = st.st_mode & 0o022
    if writers & 0o020 and _private_group(st.st_gid):
        writers &= 0o002
    if st.st_uid not in owners:
        reason, fix = "belongs to uid %d, not to you (uid %d)" % (st.st_uid, os.geteuid()), \
            "use a database in a directory of your own"
    elif writers:
        reason = "is writable by %s (mode %04o)" % (
            "group and others" if writers == 0o022 else "group" if writers == 0o020 else "others",
            stat.S_IMODE(st.st_mode))
    else:
        return
    raise StoreError("refusing database %s: %s %s, so another user could read your jobs and run "
                     "commands as you; %s" % (what[0], what[1], reason, fix))


def _private_group(gid):
    """Is `gid` our own user private group (our primary group, with no other
    members), as distributions with umask 002 give every user? Then its
    write bit lets no one else in."""
    if gid != os.getegid():
        return False
    import grp
    import pwd
    try:
        members = set(grp.getgrgid(gid).gr_mem)
        return members <= {pwd.getpwuid(os.geteuid()).pw_name}
    except KeyError:
        return False


def check_private(path, create):
    """Open the database file without following a symlink (creating it 0600
    if `create`) and refuse it, its directory or its -wal/-shm files when
    another user owns or may write them. Returns False if the file does not
    exist (and `create` is false)."""
    import stat
    parent = os.path.dirname(os.path.abspath(path))
    st = os.stat(parent)
    _refuse_unless_private(parent, st, (path, "its directory " + parent), (os.geteuid(), 0))
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = None
    if create:
        try:
            fd = os.open(path, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
    if fd is None:
        # An existing file is looked at through an O_PATH descriptor: closing
        # any other descriptor of it would drop all of this process's POSIX
        # locks on it, SQLite's too, and another process could then delete the
        # WAL under our other connections (the dashboard opens several).
        try:
            fd = os.open(path, flags | getattr(os, "O_PATH", os.O_RDONLY))
        except FileNotFoundError:
            if create:
                raise
            return False
        except OSError:
            if not os.path.islink(path):    # ELOOP, where there is no O_PATH
                raise
    if fd is not None:
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    if fd is None or stat.S_ISLNK(st.st_mode):
        raise StoreError("refusing database %s: it is a symbolic link (to %s); give the real path"
                         % (path, os.path.realpath(path)))
    if create and not os.access(path, os.R_OK | os.W_OK):
        import errno
        code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code))
    if not stat.S_ISREG(st.st_mode):
        raise StoreError("cannot open database %s: it is not a regular file" % path)
    _refuse_unless_private(path, st, (path, "the file"), (os.geteuid(),))
    for suffix in ("-wal", "-shm"):
        try:
            st = os.lstat(path + suffix)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("refusing database %s: %s is not a regular file" % (path, path + suffix))
        _refuse_unless_private(path + suffix, st, (path, "its file " + path + suffix), (os.geteuid(),))
    return True


###############################################################################
# Helpers: job ids and queue names ############################################
###############################################################################

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ID_PAIRS = None
_id_state = {"ms": 0, "prefix": "", "counter": 0}


def _base36(n, width):
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_ID_ALPHABET[r])
    return "".join(reversed(out))


def new_job_id():
    """A short id that sorts by creation time: 8 chars of milliseconds + 4 of counter.

    Within one millisecond the counter increments; it starts at a random value
    so two processes enqueueing in the same millisecond are unlikely to collide
    (a collision is detected by the UNIQUE index and retried).
    """
    global _ID_PAIRS
    state = _id_state
    ms = int(time.time() * 1000)
    if ms <= state["ms"]:
        state["counter"] += 1
        if state["counter"] >= 36 ** 4:
            state["ms"] += 1
            state["prefix"] = _base36(state["ms"], 8)
            state["counter"] = 0
    else:
        state["ms"] = ms
        state["prefix"] = _base36(ms, 8)
        state["counter"] = int.from_bytes(os.urandom(3), "big") % (36 ** 4 // 2)
    if _ID_PAIRS is None:
        _ID_PAIRS = [a + b for a in _ID_ALPHABET for b in _ID_ALPHABET]
    high, low = divmod(state["counter"], 36 * 36)
    return state["prefix"] + _ID_PAIRS[high] + _ID_PAIRS[low]


def valid_job_id(job_id):
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 128:
        return False
    if job_id[0] in "-.":
        return False
    return all(c.isascii() and (c.isalnum() or c in "._:@+-") for c in job_id)


def valid_queue_name(name):
    """1-64 letters, digits and ._- (not starting with - or .)."""
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or name[0] in "-.":
        return False
    return all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


###############################################################################
# Helpers: processes, their liveness and clean-up #############################
###############################################################################

@functools.lru_cache(maxsize=None)
def this_host():
    """This host's name (read once)."""
    import socket
    return socket.gethostname()


@functools.lru_cache(maxsize=None)
def this_boot_id():
    """'<kernel boot id>/<pid namespace>' ('' parts where there are none).

    A different boot id means every worker of the old boot is dead; a
    different pid namespace (another container on the same kernel and host
    name) means its pids cannot be checked from here.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return "%s/%s" % (boot, namespace)


def process_start(pid):
    """The start time of process `pid` in clock ticks since boot, or None.

    None means "no such process" (or a zombie) on Linux; on systems without
    /proc it means "unknown". Together with the pid it names a process uniquely, even after
    the pid is reused.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data.rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None     # a zombie has exited, whoever reaps it
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid, start):
    """True if process `pid` is alive and (where we can tell) started at `start`."""
    if os.path.isdir("/proc/self"):
        return start is not None and process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_liveness(host, boot_id, pid, start, reboot_proves_death):
    """What this process can tell of a worker process: "dead" (provably),
    "alive", or "unknown" (another host, container or boot: only its
    heartbeat and lease tell).

    A boot id other than ours on a worker of our host name proves it dead
    (this machine rebooted) only if `reboot_proves_death`, that is where no
    other machine can have our name: see Store.REBOOT_PROVES_DEATH. Where it
    does not, a pid is checked only under the same (known) boot id.
    """
    if host != this_host():
        return "unknown"
    boot, _, namespace = (boot_id or "").partition("/")
    my_boot, _, my_namespace = this_boot_id().partition("/")
    if boot and my_boot and boot != my_boot:
        return "dead" if reboot_proves_death else "unknown"
    if not reboot_proves_death and not (boot and boot == my_boot):
        return "unknown"    # nothing tells this machine from another of its name
    if namespace != my_namespace:
        return "unknown"    # another container: its pids are not ours to check
    return "alive" if process_alive(pid, start) else "dead"


def kill_job_processes(job_id, worker_id, real_db_path):
    """SIGKILL every process on this host left by `worker_id`'s run of job `job_id`.

    Used when a job's worker is lost: its command may still be running,
    orphaned. The processes are found by the QUEUECTL_JOB_ID, QUEUECTL_WORKER_ID
    and QUEUECTL_DB (`real_db_path`) their worker put in their environment: a recorded pid
    could have been reused by now, and a new run of the same job (by another
    worker) has another worker id. Linux only; returns the count.
    """
    import signal
    marks = (b"\0QUEUECTL_JOB_ID=" + job_id.encode() + b"\0",
             b"\0QUEUECTL_WORKER_ID=" + worker_id.encode() + b"\0",
             b"\0QUEUECTL_DB=" + real_db_path.encode() + b"\0")
    killed = 0
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        if all(m in environ for m in marks):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


###############################################################################
# Store #######################################################################
###############################################################################

def _json_dumps(value):
    import json
    return json.dumps(value)


def _json_loads(text):
    import json
    return json.loads(text)


def _not_utf8(params):
    bad = next((p for p in params if isinstance(p, str) and not _encodable(p)), "")
    return QueueError("%s is not valid UTF-8 text" % printable(repr(bad))[:200])


def _is_busy(error):
    """Is this sqlite3 error "database is locked" (another writer holds the lock)?"""
    msg = str(error).lower()
    return "locked" in msg or "busy" in msg


def _read_only_uri(path, parent):
    """A URI that opens `path` immutable where SQLite could not read it
    otherwise, else None: SQLite reads a WAL database only through its -shm
    file, which it cannot create on a read-only mount, nor for a file we may
    not write in a directory we may not write. Nothing changes such a file
    (short of root), so it needs neither that file nor locks. A file we may
    only read, with a -shm file or in a writable directory, SQLite opens
    read-only by itself."""
    if not os.statvfs(parent).f_flag & os.ST_RDONLY and (
            os.access(path, os.W_OK) or os.path.exists(path + "-shm") or os.access(parent, os.W_OK)):
        return None
    import urllib.parse
    return "file:%s?immutable=1" % urllib.parse.quote(os.path.abspath(path)), True


def _encodable(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _drain(fd, size=4096):
    """Read a non-blocking pipe empty (or `size` bytes, if size is 1)."""
    try:
        while os.read(fd, size) and size > 1:
            pass
    except BlockingIOError:
        pass


class _Watchdog:
    """A deadline kept by a thread of its own, for a call that may block in
    the database driver for as long as the server does not answer (a frozen
    proxy or PgBouncer, a paused server VM: the kernel keeps the TCP
    connection up, so no timeout of the driver's fires).

    arm(deadline, action): unless disarm() comes first, action() runs in the
    watchdog's thread at `deadline` (monotonic) and may return a later one
    to run again then (None: done). Without `tick`, arm() and disarm() take
    the watchdog's lock, under which the action runs: a disarm() returns
    only after an action under way has finished, so what was true when the
    caller armed (a job's process not yet reaped) still is. With `tick`
    (seconds), arm() and disarm() only set attributes, for a caller that
    arms around every statement (a lock and a thread woken would double a
    short statement's cost): the thread looks every `tick` seconds, so an
    action comes up to that late, and one that overlaps a disarm() is the
    action's own affair. The thread is started by arm(), until stop()."""

    def __init__(self, tick=None):
        self._tick = tick
        self._cond = self._thread = None
        self._deadline = self._action = None
        self._armed = 0         # arm() and disarm() calls, so that a late action's result is dropped
        self._stopping = False

    def arm(self, deadline, action):
        if self._thread is None:
            import threading
            if self._cond is None:
                self._cond = threading.Condition(threading.Lock())
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="queuectl-watchdog", daemon=True)
            self._thread.start()
        if self._tick is not None:
            self._armed += 1
            self._action = action
            self._deadline = deadline
            return
        with self._cond:
            self._armed += 1
            self._deadline, self._action = deadline, action
            self._cond.notify()

    def disarm(self):
        if self._tick is not None:
            self._armed += 1
            self._deadline = None
        elif self._cond is not None:
            with self._cond:
                self._armed += 1
                self._deadline = self._action = None

    def stop(self):
        """End the thread (a process that forks must have no other thread)."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._deadline = None
                self._cond.notify()
            self._thread.join()
            self._thread = None

    def _run(self):
        import signal
        # Signals go to the main thread, whose handlers and wake-up pipe
        # expect them (a thread's blocked wait must not be interrupted).
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        cond = self._cond
        with cond:
            while not self._stopping:
                armed, deadline, action = self._armed, self._deadline, self._action
                left = None if deadline is None else deadline - time.monotonic()
                if left is None or left > 0:
                    cond.wait(left if self._tick is None else min(left or self._tick, self._tick))
                    continue
                try:
                    again = action()
                except Exception:
                    again = None
                if self._armed == armed:
                    self._deadline = again


class WakeFifo:
    """How a commit wakes idle workers at once instead of their polling:
    a FIFO beside the database (`<db>-wake`), made 0600 by the first worker
    that waits on it.

    An idle worker opens it (read-write, so that it never reads EOF), then
    looks for work, then waits for the FIFO to become readable: a commit
    after the look nudges it, one before it was seen by it. A commit that
    made work claimable writes a byte per job (up to ALL) into it. A worker
    holds it open only while idle: with none idle, the writer's open fails at
    once (ENXIO) and costs about as much as a stat(); bytes nobody read are
    dropped by the kernel when the last worker closes it. Nothing depends on
    it: a lost nudge (a writer killed between commit and write, an older
    queuectl, a full pipe) is caught by the worker's slow safety poll, a
    SIGKILLed worker leaves only the FIFO itself, which the next one reuses,
    and where no FIFO can be made the worker polls as before.
    """

    ALL = 64            # bytes for "every idle worker should look" (stop, resume)

    def __init__(self, path):
        self.fd = None
        if path is None:
            return
        import stat
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                try:
                    os.mkfifo(path, 0o600)
                except FileExistsError:
                    pass        # another worker made it first
                fd = os.open(path, flags)
        except OSError:
            return              # read-only directory, a symlink: poll instead
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)        # not ours to trust: poll instead
            return
        self.fd = fd

    def fileno(self):
        return self.fd

    def nudges(self):
        """Do commits nudge this? (Yes: every writer opens the FIFO.)"""
        return True

    def drain(self, size=4096):
        """Read what is there (all of it, or one nudge: size=1, so that the
        other bytes wake other workers)."""
        _drain(self.fd, size)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def nudge(path, n):
        """Wake up to `n` idle workers waiting on the FIFO at `path`; never fails."""
        if path is None:
            return
        import stat
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return      # ENOENT: no worker ever waited here; ENXIO: none waits now
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):    # never write into a regular file
                os.write(fd, b"." * min(n, WakeFifo.ALL))
        except OSError:
            pass        # EAGAIN: the FIFO is full of nudges not yet read
        finally:
            os.close(fd)


class Store:
    """All access to the SQLite file. Every state change is one transaction.

    `durable=True` (the CLI) commits with synchronous=FULL, so an acknowledged
    enqueue survives a power cut; workers use NORMAL: losing a worker's last
    transition to a power cut only replays a run, which at-least-once allows.

    The logic and the SQL both databases share live here; PostgresStore
    overrides what differs (connection, schema, transactions, claim, clock,
    wake-up, counts). `open_store` picks one from the --db value.
    """

    #: Appended to a SELECT of rows the transaction then changes on the strength
    #: of what it read. Nothing here: SQLite's BEGIN IMMEDIATE serializes writers.
    _LOCK = ""
    #: ... and to a SELECT of rows that must not change until we commit.
    _SHARE = ""
    #: Inserts that replace or skip a row with the same key: SQLite's own forms,
    #: as UPSERT (ON CONFLICT) needs SQLite 3.24 and Ubuntu 18.04 has 3.22.
    _SET_CONFIG = "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)"
    _ADD_DEPS = "INSERT OR IGNORE INTO deps (job_id, after_id) VALUES (?, ?)"
    #: Added to _settle's UPDATE of the job (PostgreSQL: the count is written apart).
    _SELF_COUNTED = ""
    _REGISTER = """
        INSERT OR REPLACE INTO workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at)
        VALUES (?, ?, ?, ?, ?, ?, ?)"""
    #: Does a boot id other than ours on a worker of our host name prove it
    #: dead (this machine rebooted)? Yes here: an SQLite file is one host's.
    #: PostgresStore: no, two machines may share a host name (cloned VMs,
    #: containers all named localhost); their workers are judged by heartbeat.
    REBOOT_PROVES_DEATH = True

    def __init__(self, path, durable=True, busy_timeout=None, create=True):
        self.path = path
        self.conn = None
        #: The path, when reading a file that does not exist (as an empty queue in memory).
        self.missing = None
        # SQLite puts the WAL beside the database file a symlink points to.
        self._wal_path = None if path == ":memory:" else os.path.realpath(path) + "-wal"
        #: The FIFO that idle workers wait on, and how many of them the
        #: current transaction's commit should wake (see WakeFifo).
        self._wake_path = None if path == ":memory:" else os.path.realpath(path) + WAKE_SUFFIX
        self._wake = 0
        self._busy_short = False     # the busy timeout is not the full one (see _begin)
        self._now_given = False      # claim()'s caller gave the time (tests): keep it
        self.busy_timeout = busy_timeout_setting() if busy_timeout is None else busy_timeout
        self._open(durable, self.busy_timeout, create)

    # -- connection and schema ------------------------------------------------

    def _open(self, durable, busy_timeout, create):
        path = self.path
        if path != ":memory:":
            if os.path.isdir(path):
                raise StoreError("cannot open database %s: it is a directory" % path)
            parent = os.path.dirname(os.path.abspath(path))
            probe = parent
            while not os.path.exists(probe) and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
            if not os.path.isdir(probe):
                raise StoreError("cannot open database %s: %s is not a directory" % (path, probe))
            check_filesystem(parent)
        if path != ":memory:" and not create and not os.path.lexists(path):
            # Reading a queue that was never written: read an empty one, in
            # memory, so that `status` or `show` on a new machine leaves no file.
            self.missing, path = path, ":memory:"
        elif path != ":memory:":
            try:
                if create:
                    make_private_dirs(parent)
                # Create the file ourselves so that it is private (0600).
                check_private(path, create)
            except OSError as e:
                raise StoreError("cannot open database %s: %s" % (path, e.strerror or e))
        uri = False
        if not create and self.missing is None and path != ":memory:":
            path, uri = _read_only_uri(path, parent) or (path, False)
        try:
            self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                        check_same_thread=False, uri=uri)
        except sqlite3.Error as e:
            raise StoreError("cannot open database %s: %s" % (self.path, e))
        self.conn.row_factory = sqlite3.Row
        try:
            self._execute("PRAGMA synchronous = %s" % ("FULL" if durable else "NORMAL"))
            self._execute("PRAGMA journal_size_limit = %d" % WAL_SIZE_LIMIT)
            version = self._one("PRAGMA user_version")[0]
            if version != SCHEMA_VERSION:
                self._migrate(version, in_memory=path == ":memory:")
        except BaseException:
            self.close()
            raise

    def _migrate(self, version, in_memory=False):
        """Create or upgrade the schema, in one transaction.

        Two processes may start at once on a new file: BEGIN IMMEDIATE makes
        the second wait, and it re-reads the version inside its transaction.
        """
        if version > SCHEMA_VERSION:
            raise StoreError("database %s was written by a newer queuectl (schema %d, this is %d); "
                             "upgrade queuectl" % (self.path, version, SCHEMA_VERSION))
        if version == 0:
            self._check_foreign()       # before anything, even the journal mode, changes
        # journal_mode cannot change inside a transaction; WAL is persistent.
        mode = self._one("PRAGMA journal_mode = WAL")[0]
        if mode != "wal" and not in_memory:
            raise StoreError("cannot put database %s in WAL mode (journal mode is %s)" % (self.path, mode))
        with self.transaction():
            version = self._one("PRAGMA user_version")[0]
            if version == 0:
                self._check_foreign()
                self._script(SCHEMA)
            else:
                while version < SCHEMA_VERSION:
                    self._script(MIGRATIONS[version])
                    version += 1
            self._execute("PRAGMA user_version = %d" % SCHEMA_VERSION)

    def _check_foreign(self):
        if self._all("SELECT name FROM sqlite_master WHERE type = 'table'"):
            raise StoreError("%s is not a queuectl database (it has other tables)" % self.path)

    def _script(self, script):
        # executescript() would COMMIT first; run the statements one by one
        # inside our transaction instead.
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                self._execute(statement)
                statement = ""

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def interrupt(self):
        """From another thread (a _Watchdog): make the statement under way
        give up with an error. (SQLite's check comes between steps of a
        statement; not while it waits for a lock or the disk.)"""
        conn = self.conn
        if conn is not None:
            try:
                conn.interrupt()
            except sqlite3.Error:
                pass

    def location(self):
        """The database as messages name it: the file's absolute path."""
        return os.path.abspath(self.path)

    def check_writable(self):
        """Raise StoreError now if workers could not write (before a pool
        starts): on SQLite, opening for writing has checked it already."""

    #: How often a waiting reader (`wait`) reads data_version(): a cheap
    #: read of the file here, a round trip to the server on PostgreSQL.
    change_poll_seconds = 0.01

    #: The clock that due times, leases and heartbeats are compared on (here:
    #: this host's; PostgresStore uses the server's).
    clock_offset = 0.0

    def now(self):
        return time.time() + self.clock_offset

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _errors(self, params=()):
        """sqlite3's errors as one-line StoreErrors; text that is not UTF-8 as a QueueError."""
        try:
            yield
        except sqlite3.Error as e:
            raise self._error(e)
        except UnicodeEncodeError:
            raise _not_utf8(params)

    def _execute(self, sql, params=()):
        with self._errors(params):
            if self._busy_short:
                self._busy_ok()
            return self.conn.execute(sql, params)

    def _executemany(self, sql, rows, collide=False):
        """executemany(); with `collide`, a UNIQUE violation raises _Collision."""
        try:
            if self._busy_short:
                self._busy_ok()
            self.conn.executemany(sql, rows)
        except sqlite3.IntegrityError as e:
            if collide:
                raise _Collision()
            raise self._error(e)
        except sqlite3.Error as e:
            raise self._error(e)
        except UnicodeEncodeError:
            raise _not_utf8([value for row in rows for value in row])

    def _all(self, sql, params=()):
        with self._errors(params):
            if self._busy_short:
                self._busy_ok()
            return self.conn.execute(sql, params).fetchall()

    def _one(self, sql, params=()):
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _error(self, e):
        text = str(e)
        msg = text.lower()
        if _is_busy(e):
            return StoreError("database %s is locked: another process has held it for more than %gs; "
                              "try again (QUEUECTL_BUSY_TIMEOUT sets the wait)" % (self.path, self.busy_timeout))
        if isinstance(e, sqlite3.DatabaseError) and "not a database" in msg:
            return StoreError("%s is not a queuectl database (file is not a database)" % self.path)
        if "disk is full" in msg or "database or disk" in msg or ("i/o error" in msg and self._disk_full()):
            return StoreError("cannot write database %s: the disk is full; nothing was changed" % self.path)
        if "readonly" in msg or "read-only" in msg:
            return StoreError("cannot write database %s: it is read-only" % self.path)
        if "unable to open" in msg:
            return StoreError("cannot open database %s: %s" % (self.path, text))
        return StoreError("database %s: %s" % (self.path, text))

    def _disk_full(self):
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1024 * 1024

    @contextlib.contextmanager
    def transaction(self, wait=None):
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception.

        IMMEDIATE takes the write lock up front, so a transaction never fails
        half-way with "database is locked": it waits (busy timeout, or `wait`
        seconds) at BEGIN.
        """
        self._begin(wait)
        self._wake = 0
        try:
            yield
            self._execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        if self._wake:
            # After the commit: a worker nudged before it would find nothing.
            WakeFifo.nudge(self._wake_path, self._wake)

    def _begin(self, wait=None):
        """BEGIN IMMEDIATE, waiting for the lock in short naps at first.

        SQLite's own busy handler sleeps 1, 2, 5, 10 ms... between tries, while
        a queuectl transaction holds the lock for a tenth of a millisecond: with
        several busy workers most of a wait would be oversleeping. So the first
        ~20 ms of waiting are ours (naps from 50 us up); then SQLite's handler
        takes over for the rest of the busy timeout (or of `wait` seconds).

        The connection's busy timeout stays 0 after a first try that got the
        lock: nothing waits for a lock inside a write transaction, and the
        next statement outside one puts it back first (_busy_ok). A busy
        worker's transactions follow each other, so it sets it about never
        (two PRAGMAs a transaction were 2% of a job).
        """
        conn = self.conn
        full_ms = int(self.busy_timeout * 1000)
        with self._errors():
            if not self._busy_short:
                conn.execute("PRAGMA busy_timeout = 0")
                self._busy_short = True
            nap, waited = 0.00005, 0.0
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if not _is_busy(e) or waited >= 0.02:
                        break
                time.sleep(nap)
                waited += nap
                nap = min(nap * 2, 0.002)
            conn.execute("PRAGMA busy_timeout = %d" % (full_ms if wait is None else int(wait * 1000)))
            self._busy_short = wait is not None
            conn.execute("BEGIN IMMEDIATE")

    def _busy_ok(self):
        """Put the full busy timeout back (see _begin) before a statement
        outside a write transaction."""
        if self._busy_short and not self.conn.in_transaction:
            self.conn.execute("PRAGMA busy_timeout = %d" % int(self.busy_timeout * 1000))
            self._busy_short = False

    def abandon(self):
        """Roll back a transaction left open (a request that failed half-way)."""
        if self.conn is not None and self.conn.in_transaction:
            self.conn.rollback()

    @contextlib.contextmanager
    def snapshot(self):
        """BEGIN (deferred) ... COMMIT: reads inside see one state of the file
        and take no write lock; keep it short (it holds back checkpoints)."""
        self._execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self._execute("COMMIT")

    def waker(self):
        """What an idle worker waits on to be woken by a commit (a WakeFifo;
        its fileno() is None where none could be made: then poll)."""
        return WakeFifo(self._wake_path)

    def data_version(self):
        """A number that changes whenever another connection commits."""
        return self._one("PRAGMA data_version")[0]

    def wal_size(self):
        """The size of the WAL file in bytes (0 if there is none): one stat()."""
        if self._wal_path is None:
            return 0
        try:
            return os.path.getsize(self._wal_path)
        except OSError:
            return 0

    def truncate_wal(self, wait=0.1):
        """Checkpoint the whole WAL and truncate it; True if done.

        SQLite's automatic checkpoints copy the WAL back into the database but
        can start the WAL over only at a moment when no reader is using it; with
        busy workers and readers such as `status` that moment may never come, and
        the WAL grows. A TRUNCATE checkpoint waits (at most `wait` seconds; new
        writers wait with it) for the readers to finish, then starts it over.
        False if readers (or another checkpoint) kept it from finishing.
        """
        with self._errors():
            self.conn.execute("PRAGMA busy_timeout = %d" % int(wait * 1000))
            try:
                busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                busy = 1    # SQLITE_LOCKED: a statement of ours still active
            finally:
                self.conn.execute("PRAGMA busy_timeout = %d" % int(self.busy_timeout * 1000))
                self._busy_short = False
        return not busy

    # -- config ----------------------------------------------------------------

    def config(self):
        """All configuration values, defaults filled in."""
        values = dict(CONFIG_DEFAULTS)
        for row in self._all("SELECT key, value FROM config"):
            if row["key"] in values:
                values[row["key"]] = _json_loads(row["value"])
        for key in NONE_MEANS:
            # Older versions stored `0s` as 0: it always meant "none" for `0`.
            if not values[key]:
                values[key] = None
        return values

    def set_config(self, key, value):
        with self.transaction():
            self._execute(self._SET_CONFIG, (key, _json_dumps(value)))

    # -- enqueue ---------------------------------------------------------------

    def enqueue(self, jobs, now=None):
        """Insert jobs (dicts from `validate_job`); all or none. Returns their ids
        (for a job whose unique key an active job holds: that job's id)."""
        return [job_id for job_id, _ in self.submit(jobs, now)]

    def submit(self, jobs, now=None):
        """enqueue(), returning (id, created) for each job: created is False when
        an active job held its unique key and nothing was added for it.

        Fields left out take the configured defaults. A user-supplied id that
        exists already is an error; a generated id that collides (two processes
        in the same millisecond drew the same counter) is drawn again. Unique
        keys and dependencies are checked inside the write transaction, so two
        enqueuers racing with one key serialize and the second finds the first.
        """
        now = self.now() if now is None else now
        for _ in range(5):
            try:
                return self._enqueue(jobs, now)
            except _Collision:
                continue
        raise QueueError("could not generate unique job ids; please retry")

    def _enqueue(self, jobs, now):
        with self.transaction():
            config = self.config()
            given = [job["id"] for job in jobs if job.get("id") is not None]
            if len(set(given)) != len(given):
                seen = set()
                raise QueueError("job %r appears twice in the input" % next(
                    i for i in given if i in seen or seen.add(i)))
            ids = [job.get("id") or new_job_id() for job in jobs]
            result = [(job_id, True) for job_id in ids]
            alias = {}          # a given id -> the existing job that its unique key found
            keys = {}
            for i, job in enumerate(jobs):
                key = job.get("unique")
                if key is None:
                    continue
                if key not in keys:
                    row = self._one("""
                        SELECT id FROM jobs
                        WHERE unique_key = ? AND unique_key IS NOT NULL
                          AND state IN ('pending', 'failed', 'processing')""", (key,))
                    keys[key] = (row["id"], False) if row else (ids[i], True)
                    if row is None:
                        continue
                result[i] = keys[key][0], False
                alias[ids[i]] = keys[key][0]
            # A given id must be new, unless its unique key found the job
            # (the same cron line with --id and --unique, run again).
            given = [job["id"] for i, job in enumerate(jobs) if job.get("id") is not None and result[i][1]]
            for i in range(0, len(given), 500):
                chunk = given[i:i + 500]
                rows = self._all("SELECT id FROM jobs WHERE id IN (%s)" % ",".join("?" * len(chunk)),
                                 chunk)
                if rows:
                    raise QueueError("job %r already exists" % rows[0]["id"])
            new = {ids[i]: job for i, job in enumerate(jobs) if result[i][1]}
            born_dead, blocked = self._dependencies(new, alias)
            rows, deps, added = [], [], {}
            for job_id, job in new.items():
                max_retries = job.get("max_retries")
                # A delay counts from the moment of the enqueue, by the store's clock.
                run_at = now + job["delay"] if job.get("delay") is not None else job.get("run_at", now)
                queue = job.get("queue", DEFAULT_QUEUE)
                state = "dead" if job_id in born_dead else "pending"
                waits = blocked.get(job_id, 0)
                rows.append((
                    job_id,
                    job["command"],
                    job["cwd"],
                    state,
                    job.get("priority", 0),
                    config["max_retries"] if max_retries is None else max_retries,
                    job.get("timeout", config["timeout"]),
                    run_at,
                    now,
                    now,
                    # Due now and not blocked: claimable at once, no promotion.
                    1 if state == "pending" and not waits and run_at <= now else 0,
                    queue,
                    waits,
                    job.get("unique"),
                    None if job.get("env") is None else _json_dumps(job["env"]),
                    born_dead.get(job_id),
                ))
                deps.extend((job_id, alias.get(a, a)) for a in job.get("after", ()))
                added[(queue, state)] = added.get((queue, state), 0) + 1
            for queue in {q for q, _ in added}:
                self._add_queue(queue)
            # A generated id that collided raises _Collision: submit() retries.
            self._executemany("""
                INSERT INTO jobs (id, command, cwd, state, priority, max_retries, timeout,
                                  run_at, created_at, updated_at, ready, queue, blocked,
                                  unique_key, env, outcome)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", rows, collide=True)
            if deps:
                self._executemany(self._ADD_DEPS, deps)
            self._count_added(added)
            # The jobs claimable now; for jobs that wait for their time, one
            # nudge, so that an idle worker learns the next due time.
            claimable = sum(row[10] for row in rows)
            self._wake += claimable or any(row[3] == "pending" and not row[10] and not row[12] for row in rows)
        return result

    def _count_added(self, added):
        """Add {(queue, state): n} new jobs to the counts; the caller holds the transaction."""
        for (queue, state), n in added.items():
            self._execute("UPDATE counts SET n = n + ? WHERE queue = ? AND state = ?", (n, queue, state))

    def _add_queue(self, name):
        """Make sure the queue has its row and its five counts; the caller holds the transaction."""
        if self._execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (name,)).rowcount:
            self.conn.executemany("INSERT OR IGNORE INTO counts (queue, state, n) VALUES (?, ?, 0)",
                                  [(name, state) for state in STATES])

    def _dependencies(self, new, alias):
        """Check the `after` lists of the jobs about to be added ({id: job});
        the caller holds the transaction. Returns ({id: outcome} of jobs born
        dead because a dependency is dead, {id: dependencies not completed}).
        Unknown ids and cycles are errors."""
        if not any("after" in job for job in new.values()):
            return {}, {}
        state = {}
        wanted = sorted({alias.get(a, a) for job in new.values() for a in job.get("after", ())} - set(new))
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            # Locked against a concurrent finish (PostgreSQL): it sees our
            # deps rows and unblocks the new job, or we see it completed.
            for row in self._all("SELECT id, state FROM jobs WHERE id IN (%s)" % ",".join("?" * len(chunk))
                                 + self._SHARE, chunk):
                state[row["id"]] = row["state"]
        for job_id, job in new.items():
            for a in job.get("after", ()):
                a = alias.get(a, a)
                if a not in state and a not in new:
                    raise QueueError("field 'after': job %r not found" % a)
        # Dependencies before dependents (a depth-first walk of the new jobs,
        # without recursion: a --file may hold a chain of thousands); old jobs
        # cannot depend on new ones, so a cycle can only be among new ones.
        order, color = [], {}
        for root in new:
            if root in color:
                continue
            color[root] = "open"
            stack = [(root, iter(new[root].get("after", ())))]
            while stack:
                job_id, deps = stack[-1]
                a = next(deps, None)
                if a is None:
                    color[job_id] = "done"
                    order.append(job_id)
                    stack.pop()
                    continue
                a = alias.get(a, a)
                if a not in new or color.get(a) == "done":
                    continue
                if color.get(a) == "open":
                    path = [j for j, _ in stack]
                    raise QueueError("dependency cycle: %s" % " -> ".join(path[path.index(a):] + [a]))
                color[a] = "open"
                stack.append((a, iter(new[a].get("after", ()))))
        born_dead, blocked = {}, {}
        for job_id in order:
            for a in new[job_id].get("after", ()):
                a = alias.get(a, a)
                if a in born_dead or state.get(a) == "dead":
                    born_dead.setdefault(job_id, "dependency %s dead" % a)
                elif a in new or state[a] != "completed":
                    blocked[job_id] = blocked.get(job_id, 0) + 1
        return born_dead, blocked

    # -- claim, heartbeat, finish ------------------------------------------------

    def stop_requested(self, worker_id):
        """Has `worker stop` asked this worker to stop? (A read; no lock.)"""
        row = self._one("SELECT stop_requested FROM workers WHERE id = ?", (worker_id,))
        return bool(row and row[0] & STOP_ASKED)

    #: Waiting jobs (in jobs_waiting) whose run_at (the parameter) has passed.
    _WAITING_DUE = "ready = 0 AND blocked = 0 AND state IN ('pending', 'failed') AND run_at <= ?"

    @staticmethod
    def _served(queues):
        """SQL that keeps the queues a worker serves (all when None), and its parameters."""
        if queues is None:
            return "", ()
        return "AND q.name IN (%s)" % ",".join("?" * len(queues)), tuple(queues)

    def due_at(self, now, queues=None):
        """Cheap read-only check (no lock taken): when could a claim take a
        job? `now` if it could now: a job is ready in a queue we serve that is
        neither paused nor at its limit, or a waiting job is due (a claim would
        promote it); else the time the next waiting job falls due; None if no
        job waits for its time. An index seek per queue, and one."""
        served, params = self._served(queues)
        ready, first = self._one("""
            SELECT EXISTS (SELECT 1 FROM queues q
                           WHERE q.paused = 0 %s
                             AND EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_ready
                                         WHERE ready = 1 AND queue = q.name)
                             AND (q.max_running IS NULL
                                  OR (SELECT COUNT(*) FROM jobs INDEXED BY jobs_running
                                      WHERE state = 'processing' AND queue = q.name) < q.max_running)),
                   (SELECT min(run_at) FROM jobs INDEXED BY jobs_waiting
                    WHERE ready = 0 AND blocked = 0 AND state IN ('pending', 'failed'))""" % served, params)
        return now if ready or first is not None and first <= now else first

    def has_due(self, now, queues=None):
        """Could a claim take a job now? (due_at: a read, no lock.)"""
        due = self.due_at(now, queues)
        return due is not None and due <= now

    def claim(self, worker_id, now=None, lease=LEASE_SECONDS, queues=None):
        """Atomically take the next due job for `worker_id`, or return None.

        Inside one BEGIN IMMEDIATE transaction: promote the waiting jobs whose
        run_at has passed (ready = 1); among the queues in `queues` (None: all)
        that are not paused and run fewer jobs than their limit, take the head
        of each in jobs_ready (highest priority, then earliest due time, then
        enqueue order) and pick the best of those heads; mark it processing
        under a lease; count the attempt; open its run record. jobs_ready
        holds only ready jobs, and a paused or full queue is skipped whole, so
        the cost does not depend on jobs the claim cannot take. The limit holds
        across every pool and host: the count of the queue's processing jobs
        and the claim are in one write transaction.
        Returns the job as a dict with the new run number under 'run'; None
        when nothing is due or the worker has been asked to stop.
        """
        # The time is read once the transaction holds the lock (SQLite; see
        # PostgresStore._claim), so that runs are stamped in the order the
        # locks gave: another worker's result that freed our slot, or
        # completed our job's dependency, is never stamped after our start.
        self._now_given = now is not None
        with self.transaction():
            return self._claim(worker_id, self.now() if now is None else now, lease, queues)

    def _claim(self, worker_id, now, lease, queues=None):
        """The body of claim(); the caller holds the transaction."""
        served, params = self._served(queues)
        # The seq of the job to take: the best of the heads of jobs_ready in
        # the queues we serve that are neither paused nor full. When a single
        # queue is open to us and it has no limit (everything in `default`),
        # its head is read straight from the index: the same job, without
        # the sort of the heads (a temporary b-tree, a fifth of a claim).
        # Indexes named: the planner would rather use jobs_state and sort.
        head = """COALESCE(
            (SELECT seq FROM jobs INDEXED BY jobs_ready
             WHERE ready = 1 AND queue = (SELECT CASE WHEN COUNT(*) = 1 AND MAX(max_running) IS NULL
                                                      THEN MAX(name) END
                                          FROM queues q WHERE q.paused = 0 %s)
             ORDER BY priority DESC, run_at, seq
             LIMIT 1),
            (SELECT j.seq FROM queues q
             JOIN jobs j ON j.seq = (SELECT seq FROM jobs INDEXED BY jobs_ready
                                     WHERE ready = 1 AND queue = q.name
                                     ORDER BY priority DESC, run_at, seq
                                     LIMIT 1)
             WHERE q.paused = 0 %s
               AND (q.max_running IS NULL
                    OR (SELECT COUNT(*) FROM jobs INDEXED BY jobs_running
                        WHERE state = 'processing' AND queue = q.name) < q.max_running)
             ORDER BY j.priority DESC, j.run_at, j.seq
             LIMIT 1))""" % (served, served)
        params += params
        # One read, the claim of a busy worker's every job, also answers
        # whether we were asked to stop, and whether a waiting job is due:
        # then promote it and read the head again (once in a job's life, or
        # once per backoff).
        row = self._one("""
            SELECT (SELECT stop_requested FROM workers WHERE id = ?) AS stop_requested_,
                   EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_waiting WHERE %s) AS due_,
                   j.*
            FROM (SELECT 1) one
            LEFT JOIN jobs j ON j.seq = %s""" % (self._WAITING_DUE, head), (worker_id, now) + params)
        job = dict(zip(row.keys(), row))    # (dict(row) looks each name up: 7x slower)
        if (job.pop("stop_requested_") or 0) & STOP_ASKED:
            return None
        if job.pop("due_"):
            self._promote(now)
            row = self._one("SELECT * FROM jobs WHERE seq = %s" % head, params)
            job = row and dict(zip(row.keys(), row))
        if not job or job["seq"] is None:
            return None
        job["attempts"] += 1
        job["run_count"] += 1
        job["run"] = job["run_count"]
        self._execute("""
            UPDATE jobs
            SET state = 'processing', ready = 0, attempts = ?, run_count = ?, worker_id = ?,
                lease_until = ?, updated_at = ?
            WHERE seq = ?""", (job["attempts"], job["run"], worker_id, now + lease, now, job["seq"]))
        self._execute("""
            INSERT INTO runs (job_id, run, attempt, worker_id, started_at)
            VALUES (?, ?, ?, ?, ?)""", (job["id"], job["run"], job["attempts"], worker_id, now))
        job["state"] = "processing"
        return job

    def _promote(self, now):
        """Mark waiting jobs whose run_at has passed ready; the caller holds
        the transaction. A seek in jobs_waiting plus one write per job that
        becomes due, once in its life (or once per backoff)."""
        self._execute("UPDATE jobs INDEXED BY jobs_waiting SET ready = 1 WHERE %s" % self._WAITING_DUE, (now,))

    def append_output(self, job_id, run, worker_id, chunks, drop):
        """Store chunks [(stream, pos, data)] of a running job's output for
        `logs --follow`, if `worker_id` still holds the run; first delete its
        `drop` oldest bytes' worth of chunks (the worker keeps the total under
        LIVE_OUTPUT_LIMIT). One transaction; False if the lease is gone."""
        with self.transaction(wait=HEARTBEAT_BUSY_MS / 1000.0):
            held = self._one("""
                SELECT 1 FROM jobs
                WHERE id = ? AND state = 'processing' AND worker_id = ? AND run_count = ?""",
                             (job_id, worker_id, run))
            if held is None:
                return False
            while drop > 0:
                row = self._one("""
                    SELECT id, length(data) FROM output WHERE job_id = ? AND run = ?
                    ORDER BY id LIMIT 1""", (job_id, run))
                if row is None:
                    break
                self._execute("DELETE FROM output WHERE id = ?", (row[0],))
                drop -= row[1]
            self._executemany("""
                INSERT INTO output (job_id, run, stream, pos, data) VALUES (?, ?, ?, ?, ?)""",
                              [(job_id, run, stream, pos, data) for stream, pos, data in chunks])
        return True

    def heartbeat(self, worker_id, job_id=None, now=None, lease=LEASE_SECONDS, stopping=False):
        """Renew the worker's liveness and its job's lease, in one transaction.
        `stopping` marks the worker as stopping (e.g. after a signal).

        Returns (stop_requested, cancel_requested, lease_held).
        """
        now = self.now() if now is None else now
        # Wait only briefly for the lock: the lease has time to spare, and the
        # runner must keep enforcing timeouts and stops meanwhile.
        with self.transaction(wait=HEARTBEAT_BUSY_MS / 1000.0):
            cur = self._execute("""
                UPDATE workers SET heartbeat_at = ?, stop_requested = stop_requested | ?
                WHERE id = ?""", (now, STOP_SELF if stopping else 0, worker_id))
            if cur.rowcount == 0:
                # Our row was removed (e.g. we were suspended and taken for dead).
                self._register(worker_id, now)
            stop = self._one("SELECT stop_requested FROM workers WHERE id = ?", (worker_id,))[0] & STOP_ASKED
            cancel, held = False, True
            if job_id is not None:
                cur = self._execute("""
                    UPDATE jobs SET lease_until = ?
                    WHERE id = ? AND worker_id = ? AND state = 'processing'""",
                                    (now + lease, job_id, worker_id))
                held = cur.rowcount == 1
                if held:
                    cancel = bool(self._one("SELECT cancel_requested FROM jobs WHERE id = ?",
                                            (job_id,))[0])
        return bool(stop), cancel, held

    def _settle(self, job, run, outcome, exit_code, ok, now, stdout=None, stderr=None,
                interrupted=False, live=True, dependents=True):
        """Move a processing job on after a run; the caller holds the transaction.
        dependents=False: no job depends on this one (nothing to unblock or bury).

        ok -> completed; interrupted -> pending with the attempt given back;
        cancelled -> dead; otherwise failed with backoff, or dead when the
        job has used max_retries + 1 runs.
        """
        if ok:
            state, run_at = "completed", job["run_at"]
        elif interrupted:
            state, run_at = "pending", job["run_at"]
        elif outcome == "cancelled" or job["attempts"] > job["max_retries"]:
            state, run_at = "dead", job["run_at"]
        else:
            config = self.config()
            state = "failed"
            run_at = now + backoff_delay(job["attempts"], config["backoff_base"], config["backoff_max"])
        # A job due again at once (interrupted, or a zero backoff) is ready now;
        # one that waits for its retry time is promoted by the claim after it.
        ready = 1 if state in DUE_STATES and run_at <= now else 0
        self._execute("""
            UPDATE jobs
            SET state = ?, ready = ?, run_at = ?, attempts = attempts - ?, exit_code = ?, outcome = ?,
                worker_id = NULL, lease_until = NULL, cancel_requested = 0, updated_at = ?%s
            WHERE id = ?""" % self._SELF_COUNTED, (state, ready, run_at, 1 if interrupted else 0, exit_code,
                                                   outcome, now, job["id"]))
        self._execute("""
            UPDATE runs
            SET finished_at = ?, exit_code = ?, outcome = ?, result_state = ?, stdout = ?, stderr = ?
            WHERE job_id = ? AND run = ?""",
                      (now, exit_code, outcome, state, stdout, stderr, job["id"], run))
        if live:        # the run stored live output (or may have: a reclaim)
            self._execute("DELETE FROM output WHERE job_id = ? AND run = ?", (job["id"], run))
        # A finished run may free a slot in a limited queue (or be due again at
        # once): an idle worker that serves that queue looks again.
        self._wake += 1
        if state in ("completed", "dead") and dependents:
            if state == "completed":
                self._unblock(job["id"])
            else:
                self._bury_dependents(job["id"], now)
        return state, run_at

    def _dependents(self, job_id, states):
        """Ids of the jobs in `states` that run after this one. (One by one by id:
        with `id IN (SELECT ...)` the planner would walk jobs_state instead.)"""
        out = []
        for row in self._all("SELECT job_id FROM deps WHERE after_id = ?", (job_id,)):
            job = self._one("SELECT state FROM jobs WHERE id = ?", (row[0],))
            if job is not None and job[0] in states:
                out.append(row[0])
        return out

    def _unblock(self, job_id):
        """A job completed: its dependents wait for one dependency fewer (those
        left with none enter jobs_waiting, and the next claim promotes them)."""
        for dependent in self._dependents(job_id, DUE_STATES):
            self._execute("UPDATE jobs SET blocked = blocked - 1 WHERE id = ? AND blocked > 0", (dependent,))
            self._wake += 1

    def _bury_dependents(self, job_id, now):
        """A job went dead: every job waiting for it goes dead too, unrun, with
        the outcome 'dependency ID dead', and so on down the chain (one
        transaction; the chain is walked breadth first)."""
        dead = [job_id]
        while dead:
            parent = dead.pop()
            for dependent in self._dependents(parent, DUE_STATES):
                self._execute("""
                    UPDATE jobs SET state = 'dead', ready = 0, outcome = ?, exit_code = NULL, updated_at = ?
                    WHERE id = ? AND state IN ('pending', 'failed')""", ("dependency %s dead" % parent, now, dependent))
                dead.append(dependent)

    def finish(self, job_id, run, worker_id, result, now=None, interrupted=False, claim_next=False,
               lease=LEASE_SECONDS, queues=None, live=True):
        """Record a run's result and move the job on, if `worker_id` still holds it.

        Returns (state, run_at), or None when the lease was lost (the job was
        reclaimed meanwhile): then only the run's own record is completed.
        With claim_next, the worker's next job is claimed in the same
        transaction (half the commits and lock waits of a busy worker) and
        ((state, run_at) or None, next job or None) is returned (from `queues`).
        live=False: the worker stored no live output for this run (nothing to delete).
        """
        self._now_given = now is not None
        with self.transaction():
            now = self.now() if now is None else now      # under the lock (see claim)
            settled = self._finish(job_id, run, worker_id, result, now, interrupted, live)
            if not claim_next:
                return settled
            return settled, self._claim(worker_id, now, lease, queues)

    def _finish(self, job_id, run, worker_id, result, now, interrupted, live=True):
        """The body of finish(); the caller holds the transaction."""
        job = self._held(job_id, worker_id)
        if job is None:
            # Reclaimed meanwhile: keep the reclaimer's record of the run,
            # but save the output, which only we have.
            self._execute("""
                UPDATE runs SET stdout = ?, stderr = ?
                WHERE job_id = ? AND run = ?""", (result.stdout, result.stderr, job_id, run))
            return None
        outcome = result.outcome
        if job["cancel_requested"] and not result.ok:
            outcome, interrupted = "cancelled", False    # a cancel wins over a hard stop
        return self._settle(job, run, outcome, result.exit_code, result.ok, now,
                            result.stdout, result.stderr, interrupted=interrupted, live=live,
                            dependents=bool(job["has_dependents"]))

    def _held(self, job_id, worker_id):
        """The job if `worker_id` holds it, with has_dependents: whether any job
        depends on it, in the same read (one statement less a job: a busy
        worker's transaction is a dozen of them). Only the columns _settle
        reads: decoding all of a row was a twentieth of a job. The caller
        holds the transaction."""
        return self._one("""
            SELECT id, run_at, attempts, max_retries, cancel_requested, queue,
                   EXISTS (SELECT 1 FROM deps WHERE after_id = jobs.id) AS has_dependents
            FROM jobs WHERE id = ? AND state = 'processing' AND worker_id = ?""",
                         (job_id, worker_id))

    # -- workers and reclaiming lost jobs ---------------------------------------

    def _register(self, worker_id, now):
        host, pid, start = worker_id.rsplit(":", 2)
        self._execute(self._REGISTER,
                      (worker_id, host, this_boot_id(), int(pid), int(start) if start != "-" else None,
                       now, now))

    def register_worker(self, worker_id, now=None):
        with self.transaction():
            self._register(worker_id, self.now() if now is None else now)

    def unregister_worker(self, worker_id):
        """Delete the worker's row; returns whether `worker stop` had asked it
        to stop (read in the same transaction, so that no request is lost)."""
        with self.transaction():
            row = self._one("SELECT stop_requested FROM workers WHERE id = ?" + self._LOCK, (worker_id,))
            self._execute("DELETE FROM workers WHERE id = ?", (worker_id,))
        return bool(row and row[0] & STOP_ASKED)

    def workers(self):
        """Registered workers, each with the job it holds now (job_id, or None)."""
        return [dict(r) for r in self._all("""
            SELECT w.id, w.host, w.boot_id, w.pid, w.pid_start, w.started_at, w.heartbeat_at,
                   w.stop_requested,
                   (SELECT j.id FROM jobs j
                    WHERE j.state = 'processing' AND j.worker_id = w.id LIMIT 1) AS job_id
            FROM workers w
            ORDER BY w.started_at, w.pid""")]

    def judge_worker(self, worker, now):
        """"dead" (provably: its process is gone), "lost" (it cannot be checked
        from here and has not been heard of for a lease: it has killed its job
        by then, or is gone; its jobs come back as their leases expire) or
        "alive" (which includes a worker of this host that is suspended)."""
        liveness = holder_liveness(worker["host"], worker["boot_id"], worker["pid"], worker["pid_start"],
                                   self.REBOOT_PROVES_DEATH)
        if liveness == "unknown":
            return "lost" if now - worker["heartbeat_at"] >= LEASE_SECONDS else "alive"
        return liveness

    def request_stop(self, now=None):
        """Ask every registered worker to finish its job and exit, and forget
        the dead and lost ones (forget_workers), in one transaction. Returns
        (the rows of the alive ones, the rows of the lost ones), judged before
        the commit wakes idle workers (which then exit at once)."""
        now = self.now() if now is None else now
        with self.transaction():
            self._execute("UPDATE workers SET stop_requested = stop_requested | ?", (STOP_ASKED,))
            self._wake = WakeFifo.ALL
            judged = {"alive": [], "dead": [], "lost": []}
            for w in self.workers():
                judged[self.judge_worker(w, now)].append(w)
            self._forget([w["id"] for w in judged["dead"]], [w["id"] for w in judged["lost"]], now)
            return judged["alive"], judged["lost"]

    def forget_workers(self, dead=(), lost=(), now=None):
        """Delete the rows of `dead` workers, and of `lost` ones still unheard
        of for a lease whose jobs' leases have all expired (a claim made since
        keeps the row; the jobs, unregistered, are then taken back at once)."""
        with self.transaction():
            self._forget(dead, lost, self.now() if now is None else now)

    def _forget(self, dead, lost, now):
        # In one order: two workers forgetting the same rows do not deadlock.
        for wid in sorted(dead):
            self._execute("DELETE FROM workers WHERE id = ?", (wid,))
        for wid in sorted(lost):
            self._execute("""
                DELETE FROM workers WHERE id = ? AND heartbeat_at <= ? AND NOT EXISTS (
                    SELECT 1 FROM jobs WHERE state = 'processing' AND worker_id = ? AND lease_until > ?)""",
                          (wid, now - LEASE_SECONDS, wid, now))

    def leases(self):
        """Processing jobs with their lease, run and holder (holder fields None if unregistered)."""
        return [dict(r) for r in self._all("""
            SELECT j.id, j.worker_id, j.lease_until, j.run_count AS run,
                   w.host, w.boot_id, w.pid, w.pid_start, w.heartbeat_at
            FROM jobs j
            LEFT JOIN workers w ON w.id = j.worker_id
            WHERE j.state = 'processing'""")]

    def reclaim(self, job_id, worker_id, run, holder_dead, now=None, before=None):
        """Take back a job whose worker died or whose lease expired: the lost
        run counts as a failed attempt. Returns (state, run_at) or None if the
        job was not (or no longer) claimable this way. `before()` is called
        inside the transaction once the job is known to be taken back (the
        worker kills the lost run's processes there: the holder cannot renew
        its lease meanwhile, and no new run can start yet).
        """
        now = self.now() if now is None else now
        with self.transaction():
            job = self._one("""
                SELECT * FROM jobs
                WHERE id = ? AND state = 'processing' AND worker_id = ? AND (? = 1 OR lease_until <= ?)"""
                            + self._LOCK, (job_id, worker_id, 1 if holder_dead else 0, now))
            if job is None:
                return None
            if before is not None:
                before()
            outcome = "cancelled" if job["cancel_requested"] else "worker lost"
            return self._settle(dict(job), run, outcome, None, False, now)

    # -- reads -----------------------------------------------------------------

    def get(self, job_id):
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFound(job_id, self.missing)
        return dict(row)

    def runs(self, job_id):
        return [dict(r) for r in self._all("""
            SELECT job_id, run, attempt, worker_id, started_at, finished_at, exit_code, outcome,
                   result_state, length(stdout) AS stdout_bytes, length(stderr) AS stderr_bytes
            FROM runs WHERE job_id = ? ORDER BY run""", (job_id,))]

    def run_output(self, job_id, run=None):
        """(run, finished, stdout, stderr) of the given or the last run, or None if it never ran."""
        if run is None:
            row = self._one("""
                SELECT run, finished_at, stdout, stderr FROM runs WHERE job_id = ? ORDER BY run DESC LIMIT 1""",
                            (job_id,))
        else:
            row = self._one("SELECT run, finished_at, stdout, stderr FROM runs WHERE job_id = ? AND run = ?",
                            (job_id, run))
        if row is None:
            return None
        return row[0], row[1] is not None, bytes(row[2] or b""), bytes(row[3] or b"")

    def list_jobs(self, state=None, limit=None):
        """The most recently enqueued jobs (all, or in one state), oldest first."""
        limit = 2 ** 62 if limit is None else limit
        if state is None:
            rows = self._all("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?",
                             (state, limit))
        return [dict(r) for r in reversed(rows)]

    def counts(self):
        counts = {s: 0 for s in STATES}
        for row in self._all("SELECT state, SUM(n) AS n FROM counts GROUP BY state"):
            counts[row["state"]] = int(row["n"])
        return counts

    def queues(self):
        """Every queue: name, max_running, paused and its per-state counts
        (from the counts table: the same cost at any number of jobs)."""
        out = {r["name"]: dict(r, counts={s: 0 for s in STATES}) for r in self._all("""
            SELECT name, max_running, paused FROM queues ORDER BY name""")}
        for row in self._all("SELECT queue, state, n FROM counts"):
            if row["queue"] in out:
                out[row["queue"]]["counts"][row["state"]] = int(row["n"])
        return list(out.values())

    def dependencies(self, job_id):
        """[(id, state or None if purged)] of the jobs this one runs after."""
        return [(r["after_id"], r["state"]) for r in self._all("""
            SELECT d.after_id, j.state FROM deps d LEFT JOIN jobs j ON j.id = d.after_id
            WHERE d.job_id = ?
            ORDER BY CASE WHEN j.seq IS NULL THEN 0 ELSE 1 END, j.seq, d.after_id""", (job_id,))]

    def queue_state(self, name):
        """{max_running, paused, running} of one queue (None if it has no row)."""
        row = self._one("SELECT max_running, paused FROM queues WHERE name = ?", (name,))
        if row is None:
            return None
        running = self._one("""
            SELECT COUNT(*) FROM jobs INDEXED BY jobs_running
            WHERE state = 'processing' AND queue = ?""", (name,))[0]
        return {"max_running": row["max_running"], "paused": bool(row["paused"]), "running": running}

    def live_output(self, job_id, run, after=0):
        """Chunks of a running job's output stored since chunk id `after`:
        [(id, stream, pos, data)]."""
        return [(r[0], r[1], r[2], bytes(r[3])) for r in self._all("""
            SELECT id, stream, pos, data FROM output
            WHERE job_id = ? AND run = ? AND id > ?
            ORDER BY id""", (job_id, run, after))]

    def run_state(self, job_id):
        """(state, run_count, exit_code of the last run, whether it finished): what `logs --follow` polls."""
        row = self._one("""
            SELECT j.state, j.run_count, r.exit_code, r.finished_at
            FROM jobs j LEFT JOIN runs r ON r.job_id = j.id AND r.run = j.run_count
            WHERE j.id = ?""", (job_id,))
        if row is None:
            raise JobNotFound(job_id, self.missing)
        return row[0], row[1], row[2], row[3] is not None

    def states(self, job_ids):
        """{id: (state, exit_code, outcome)} for the given ids that exist."""
        out = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            for row in self._all("SELECT id, state, exit_code, outcome FROM jobs WHERE id IN (%s)"
                                 % ",".join("?" * len(chunk)), chunk):
                out[row["id"]] = (row["state"], row["exit_code"], row["outcome"])
        return out

    def finished_runs(self, since):
        """(finished_at, duration, result_state, outcome) of runs that ended after `since`."""
        return self._all("""
            SELECT finished_at, finished_at - started_at, result_state, outcome
            FROM runs
            WHERE finished_at >= ?""", (since,))

    # -- changes requested by the user ------------------------------------------

    def retry_dead(self, job_ids=None, now=None, reset_retries=False):
        """Move dead jobs (the given ones, or all) back to pending, attempts 0, due now,
        with the configured max_retries if `reset_retries`, else their own, and
        re-arm the jobs that died because they depended on them (recursively).
        All or nothing: an id that is unknown or not dead, a job whose own
        dependency is still dead, or a unique key an active job holds changes nothing."""
        now = self.now() if now is None else now
        with self.transaction():
            max_retries = self.config()["max_retries"] if reset_retries else None
            if job_ids is None:
                job_ids = [r["id"] for r in self._all("SELECT id FROM jobs WHERE state = 'dead' ORDER BY seq")]
            for job_id in job_ids:
                row = self._one("SELECT state FROM jobs WHERE id = ?" + self._LOCK, (job_id,))
                if row is None:
                    raise JobNotFound(job_id, self.missing)
                if row["state"] != "dead":
                    raise QueueError("job %r is not in the DLQ (it is %s)" % (job_id, row["state"]))
            retried = set(job_ids)
            for job_id in job_ids:
                waits, dead_dep = self._dependency_state(job_id, retried)
                if dead_dep is not None:
                    raise QueueError("job %r depends on %r, which is dead: retry that one (its dependents "
                                     "follow)" % (job_id, dead_dep))
                self._rearm(job_id, waits, now, max_retries)
            # Jobs that died of a dependency come back with it, down the chain,
            # unless another of their dependencies is still dead.
            parents, followed = list(job_ids), []
            while parents:
                parent = parents.pop()
                for dependent in self._dependents(parent, ("dead",)):
                    if self.get(dependent)["outcome"] != "dependency %s dead" % parent:
                        continue    # died of its own run, or of another dependency
                    waits, dead_dep = self._dependency_state(dependent, retried)
                    if dead_dep is not None:
                        self._execute("UPDATE jobs SET outcome = ? WHERE id = ?",
                                      ("dependency %s dead" % dead_dep, dependent))
                        continue
                    self._rearm(dependent, waits, now, max_retries)
                    retried.add(dependent)
                    parents.append(dependent)
                    followed.append(dependent)
        return list(job_ids) + followed

    def _dependency_state(self, job_id, reviving=()):
        """(dependencies not completed, a dead dependency or None), counting the
        jobs in `reviving` as no longer dead."""
        waits, dead = 0, None
        for row in self._all("""
                SELECT d.after_id, j.state FROM deps d LEFT JOIN jobs j ON j.id = d.after_id
                WHERE d.job_id = ?""", (job_id,)):
            if row["state"] == "dead" and row["after_id"] not in reviving:
                dead = dead or row["after_id"]
            elif row["state"] not in ("completed", None):     # None: purged, so it had finished
                waits += 1
        return waits, dead

    def _rearm(self, job_id, waits, now, max_retries=None):
        """dead -> pending, attempts 0, due now (ready unless it waits for dependencies),
        with `max_retries` if given."""
        row = self._one("SELECT unique_key FROM jobs WHERE id = ?", (job_id,))
        if row["unique_key"] is not None:
            other = self._one("""
                SELECT id FROM jobs
                WHERE unique_key = ? AND unique_key IS NOT NULL
                  AND state IN ('pending', 'failed', 'processing')""", (row["unique_key"],))
            if other is not None:
                raise QueueError("job %r has unique key %r, which job %r holds now" % (
                    job_id, row["unique_key"], other["id"]))
        self._execute("""
            UPDATE jobs
            SET state = 'pending', ready = ?, blocked = ?, attempts = 0, run_at = ?, exit_code = NULL,
                outcome = NULL, cancel_requested = 0, updated_at = ?, max_retries = COALESCE(?, max_retries)
            WHERE id = ?""", (0 if waits else 1, waits, now, now, max_retries, job_id))
        self._wake += 0 if waits else 1

    def retry_failed(self, job_ids, now=None):
        """Make failed jobs due now instead of at their backoff time. All or nothing."""
        now = self.now() if now is None else now
        with self.transaction():
            for job_id in job_ids:
                row = self._one("SELECT state FROM jobs WHERE id = ?" + self._LOCK, (job_id,))
                if row is None:
                    raise JobNotFound(job_id, self.missing)
                if row["state"] == "dead":
                    raise QueueError("job %r is dead: use 'queuectl dlq retry %s'" % (job_id, job_id))
                if row["state"] != "failed":
                    raise QueueError("job %r is %s, not failed: only a failed job waiting for its retry "
                                     "can be retried now" % (job_id, row["state"]))
                self._execute("""
                    UPDATE jobs SET run_at = ?, ready = 1, updated_at = ?
                    WHERE id = ?""", (now, now, job_id))
                self._wake += 1
        return job_ids

    def purge(self, states, before, batch=PURGE_BATCH):
        """Delete jobs in `states` last changed before `before`, with their runs.

        Candidates are read without a lock, then deleted `batch` at a time, one
        short transaction each (re-checking state and age), so workers never
        wait long. Returns how many jobs were deleted.
        """
        marks = ",".join("?" * len(states))
        deleted = 0
        while True:
            ids = [r[0] for r in self._all("""
                SELECT id FROM jobs
                WHERE state IN (%s) AND updated_at < ?
                ORDER BY seq
                LIMIT ?""" % marks, list(states) + [before, batch])]
            if not ids:
                return deleted
            params = ids + list(states) + [before]
            where = "id IN (%s) AND state IN (%s) AND updated_at < ?" % (",".join("?" * len(ids)), marks)
            with self.transaction():
                self._execute("DELETE FROM runs WHERE job_id IN (SELECT id FROM jobs WHERE %s)" % where,
                              params)
                self._execute("DELETE FROM deps WHERE job_id IN (SELECT id FROM jobs WHERE %s)" % where,
                              params)
                deleted += self._execute("DELETE FROM jobs WHERE %s" % where, params).rowcount

    @staticmethod
    def makes_queue(settings):
        """Do these queue settings make a queue that does not exist (a pause,
        a limit), or only restore the defaults (a resume, no limit)?"""
        return bool(settings.get("paused") or settings.get("max_running"))

    def set_queue(self, name, **settings):
        """Change a queue's max_running and/or paused (creating the queue);
        returns whether it existed before, or None, changing nothing, for a
        queue that does not exist and would only get the defaults (a resume
        or a limit removed: most likely a mistyped name)."""
        with self.transaction():
            existed = self._one("SELECT 1 FROM queues WHERE name = ?", (name,)) is not None
            if not existed and not self.makes_queue(settings):
                return None
            self._add_queue(name)
            for column in ("max_running", "paused"):
                if column in settings:
                    self._execute("UPDATE queues SET %s = ? WHERE name = ?" % column, (settings[column], name))
            self._wake = WakeFifo.ALL      # resumed, or a limit raised: its jobs may run now
        return existed

    def cancel(self, job_ids, now=None):
        """Cancel jobs: waiting ones go to the DLQ now, running ones are asked to
        stop (their worker kills them within a heartbeat). All or nothing.
        Returns {id: 'dead' | 'cancelling'}."""
        now = self.now() if now is None else now
        result = {}
        with self.transaction():
            for job_id in job_ids:
                row = self._one("SELECT state FROM jobs WHERE id = ?" + self._LOCK, (job_id,))
                if row is None:
                    raise JobNotFound(job_id, self.missing)
                state = row["state"]
                if state in DUE_STATES:
                    self._execute("""
                        UPDATE jobs SET state = 'dead', ready = 0, outcome = 'cancelled', updated_at = ?
                        WHERE id = ?""", (now, job_id))
                    self._bury_dependents(job_id, now)
                    result[job_id] = "dead"
                elif state == "processing":
                    self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    result[job_id] = "cancelling"
                else:
                    raise QueueError("job %r cannot be cancelled: it is already %s" % (job_id, state))
        return result

    # -- dashboard reads: each bounded by a LIMIT (or a seq window) and an index --

    @staticmethod
    def _job_filter(low=None, high=None, state=None, text=None, outcome=None, queue=None):
        """WHERE clause and parameters for find_jobs and count_matching:
        low <= seq < high, the state, the queue, the text, the (outcome, exit_code) group."""
        where, params = ["1 = 1"], []
        for clause, value, given in (("seq >= ?", low, low is not None), ("seq < ?", high, high is not None),
                                     ("state = ?", state, state is not None),
                                     ("queue = ?", queue, queue is not None)):
            if given:
                where.append(clause)
                params.append(value)
        if text:
            where.append("(instr(command, ?) > 0 OR instr(id, ?) = 1)")
            params += [text, text]
        if outcome is not None:
            where.append("outcome IS ? AND exit_code IS ?")
            params += list(outcome)
        return " AND ".join(where), params

    def find_jobs(self, state=None, text=None, outcome=None, before=None, upto=None,
                  limit=50, scan=None, queue=None):
        """Jobs newest first (keyset pagination on seq): in `state`; in `queue`;
        whose command contains `text` or whose id starts with it; dead with this
        (outcome, exit_code) group. `before`: only seq < before; `upto`: only seq <= upto.

        Filters that no index serves (text, outcome, queue) look at most `scan` jobs
        back from `before`, so a rare match costs a bounded walk, not a table
        scan. Returns (jobs, low): low is the lowest seq looked at (None if
        the walk was not cut short)."""
        top = (self._one("SELECT MAX(seq) FROM jobs")[0] or 0) + 1 if before is None else before
        if upto is not None:
            top = min(top, upto + 1)
        low = top - scan if scan is not None and (text or outcome is not None or queue is not None) else None
        where, params = self._job_filter(low, top, state, text, outcome, queue)
        rows = self._all("""
            SELECT * FROM jobs
            WHERE %s
            ORDER BY seq DESC
            LIMIT ?""" % where, params + [limit])
        if low is not None and (len(rows) == limit or low <= (self._one("SELECT MIN(seq) FROM jobs")[0] or 0)):
            low = None
        return [dict(r) for r in rows], low

    def count_matching(self, state=None, outcome=None, upto=None, cap=100000):
        """How many jobs find_jobs(state, outcome=outcome, upto=upto) would list
        without a limit, counting at most `cap` + 1."""
        where, params = self._job_filter(None, None if upto is None else upto + 1, state, outcome=outcome)
        return self._one("""
            SELECT COUNT(*) FROM (
                SELECT 1 FROM jobs
                WHERE %s
                LIMIT ?) AS matching""" % where, params + [cap + 1])[0]

    def dead_groups(self, scan=20000):
        """The newest `scan` dead jobs grouped by (outcome, exit_code), biggest
        group first: dicts with outcome, exit_code, jobs, last_at, max_seq."""
        return [dict(r) for r in self._all("""
            SELECT outcome, exit_code, COUNT(*) AS jobs, MAX(updated_at) AS last_at, MAX(seq) AS max_seq
            FROM (SELECT outcome, exit_code, updated_at, seq FROM jobs
                  WHERE state = 'dead'
                  ORDER BY seq DESC
                  LIMIT ?) AS newest
            GROUP BY outcome, exit_code
            ORDER BY jobs DESC, max_seq DESC""", (scan,))]

    def oldest_due(self, now):
        """run_at of the longest-waiting due job outside paused queues, or None. A due job is either
        ready (the first entry of each queue and priority in jobs_ready, found
        by skipping from priority to priority: a few index seeks per queue and
        distinct priority, never a walk of the queue) or waiting to be promoted
        (the first due entry of jobs_waiting)."""
        row = self._one("""
            SELECT run_at FROM jobs INDEXED BY jobs_waiting
            WHERE ready = 0 AND blocked = 0 AND state IN ('pending', 'failed') AND run_at <= ?
              AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)
            ORDER BY run_at
            LIMIT 1""", (now,))
        firsts = [] if row is None else [row[0]]
        # Paused queues are left out: their jobs wait because someone asked.
        for (queue,) in self._all("SELECT name FROM queues WHERE paused = 0"):
            firsts.append(self._one("""
                WITH RECURSIVE p(pr) AS (
                    SELECT (SELECT priority FROM jobs INDEXED BY jobs_ready
                            WHERE ready = 1 AND queue = :q
                            ORDER BY priority DESC, run_at, seq LIMIT 1)
                    UNION ALL
                    SELECT (SELECT priority FROM jobs INDEXED BY jobs_ready
                            WHERE ready = 1 AND queue = :q AND priority < p.pr
                            ORDER BY priority DESC, run_at, seq LIMIT 1)
                    FROM p
                    WHERE p.pr IS NOT NULL
                    LIMIT 1000
                )
                SELECT MIN((SELECT run_at FROM jobs INDEXED BY jobs_ready
                            WHERE ready = 1 AND queue = :q AND priority = p.pr
                            ORDER BY priority DESC, run_at, seq LIMIT 1))
                FROM p
                WHERE p.pr IS NOT NULL""", {"q": queue})[0])
        firsts = [t for t in firsts if t is not None]
        return min(firsts) if firsts else None

    def recent_runs(self, job_id, limit=100):
        """The job's last `limit` runs, oldest first (as runs() gives them)."""
        return [dict(r) for r in reversed(self._all("""
            SELECT job_id, run, attempt, worker_id, started_at, finished_at, exit_code, outcome,
                   result_state, length(stdout) AS stdout_bytes, length(stderr) AS stderr_bytes
            FROM runs WHERE job_id = ?
            ORDER BY run DESC
            LIMIT ?""", (job_id, limit)))]

    def runs_finished_after(self, since, limit=10000):
        """(job_id, run, finished_at, duration, outcome, result_state) of runs that
        ended at or after `since`, oldest first (the runs_finished index)."""
        return self._all("""
            SELECT job_id, run, finished_at, finished_at - started_at, outcome, result_state
            FROM runs
            WHERE finished_at >= ?
            ORDER BY finished_at
            LIMIT ?""", (since, limit))

    def run_totals(self, bounds):
        """Every finished run still stored, as (outcome, result_state, bucket,
        count, summed duration), bucket i holding durations <= bounds[i] (and
        above the bound before; len(bounds): longer). One pass over the runs
        table (about a second per million runs): the dashboard reads it once,
        in the background, when it starts."""
        case = " ".join("WHEN d <= ? THEN %d" % i for i in range(len(bounds)))
        return self._all("""
            SELECT outcome, result_state, CASE %s ELSE %d END AS bucket, COUNT(*), SUM(d)
            FROM (SELECT outcome, result_state, finished_at - started_at AS d
                  FROM runs
                  WHERE finished_at IS NOT NULL) AS finished
            GROUP BY outcome, result_state, bucket""" % (case, len(bounds)), list(bounds))

    def newest(self):
        """(highest job seq, latest run finished_at, highest dead job's seq): None when none."""
        return tuple(self._one("""
            SELECT (SELECT MAX(seq) FROM jobs),
                   (SELECT MAX(finished_at) FROM runs),
                   (SELECT MAX(seq) FROM jobs WHERE state = 'dead')"""))

    def change_marks(self):
        """Cheap marks that change when the jobs, runs or workers shown change:
        (counts, max seq, last finished_at, max dead seq, workers as workers() gives them)."""
        return (self.counts(),) + self.newest() + (self.workers(),)


def open_store(path, durable=True, busy_timeout=None, create=True, listen=False):
    """The store for --db / $QUEUECTL_DB: PostgresStore for a postgresql://
    (or postgres://) URL, else Store on a SQLite file. `listen`: a worker's
    store, woken by the database when work becomes due (where it can be)."""
    check_db_location(path)
    if is_postgres_url(path):
        return PostgresStore(path, durable=durable, busy_timeout=busy_timeout, create=create, listen=listen)
    return Store(path, durable=durable, busy_timeout=busy_timeout, create=create)


def store_exists(path):
    """Is there a queue at `path` already (the file, or queuectl's tables)?"""
    check_db_location(path)
    if is_postgres_url(path):
        with PostgresStore(path, create=False) as store:
            return store.missing is None
    return os.path.exists(path)


#: The PostgreSQL schema: the same tables as SCHEMA, in PostgreSQL's types.
#: The counts are insert-only deltas (count_deltas), folded into count_base by
#: workers from time to time, so that no transition waits for another's
#: count row (the counts view adds both up).
PG_TABLES = """
CREATE TABLE queuectl_version (version INTEGER NOT NULL);
CREATE TABLE jobs (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    command          TEXT NOT NULL,
    cwd              TEXT NOT NULL,
    state            TEXT NOT NULL,
    priority         BIGINT NOT NULL DEFAULT 0,
    attempts         BIGINT NOT NULL DEFAULT 0,
    max_retries      BIGINT NOT NULL,
    timeout          DOUBLE PRECISION,
    run_at           DOUBLE PRECISION NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    exit_code        BIGINT,
    outcome          TEXT,
    run_count        BIGINT NOT NULL DEFAULT 0,
    worker_id        TEXT,
    lease_until      DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    ready            INTEGER NOT NULL DEFAULT 0,
    queue            TEXT NOT NULL DEFAULT 'default',
    blocked          BIGINT NOT NULL DEFAULT 0,
    unique_key       TEXT,
    env              TEXT,
    self_counted     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, seq) WHERE ready = 1;
CREATE INDEX jobs_waiting ON jobs (run_at) WHERE ready = 0 AND blocked = 0 AND state IN ('pending', 'failed');
CREATE INDEX jobs_running ON jobs (queue) WHERE state = 'processing';
CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('pending', 'failed', 'processing');
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    max_running BIGINT,
    paused      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO queues (name) VALUES ('default');
CREATE TABLE deps (
    job_id   TEXT NOT NULL,
    after_id TEXT NOT NULL,
    PRIMARY KEY (job_id, after_id)
);
CREATE INDEX deps_after ON deps (after_id);
CREATE TABLE output (
    id     BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    run    BIGINT NOT NULL,
    stream INTEGER NOT NULL,
    pos    BIGINT NOT NULL,
    data   BYTEA NOT NULL
);
CREATE INDEX output_run ON output (job_id, run, id);
CREATE TABLE runs (
    job_id       TEXT NOT NULL,
    run          BIGINT NOT NULL,
    attempt      BIGINT NOT NULL,
    worker_id    TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    finished_at  DOUBLE PRECISION,
    exit_code    BIGINT,
    outcome      TEXT,
    result_state TEXT,
    stdout       BYTEA,
    stderr       BYTEA,
    PRIMARY KEY (job_id, run)
);
CREATE INDEX runs_finished ON runs (finished_at);
CREATE TABLE workers (
    id             TEXT PRIMARY KEY,
    host           TEXT NOT NULL,
    boot_id        TEXT NOT NULL,
    pid            BIGINT NOT NULL,
    pid_start      BIGINT,
    started_at     DOUBLE PRECISION NOT NULL,
    heartbeat_at   DOUBLE PRECISION NOT NULL,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE count_base (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    n     BIGINT NOT NULL,
    PRIMARY KEY (queue, state)
);
CREATE TABLE count_deltas (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    n     BIGINT NOT NULL
);
CREATE VIEW counts AS
    SELECT queue, state, SUM(n)::BIGINT AS n
    FROM (SELECT queue, state, n FROM count_base
          UNION ALL
          SELECT queue, state, n FROM count_deltas) AS c
    GROUP BY queue, state;
"""
#: A change of state the trigger counts, unless the statement counted it
#: itself and said so by flipping jobs.self_counted (see PostgresStore._settle).
_PG_COUNT_UPDATE_TRIGGER = """
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state <> NEW.state AND OLD.self_counted = NEW.self_counted)
    EXECUTE PROCEDURE queuectl_count_update();
"""
#: ... and the triggers that keep the counts (EXECUTE PROCEDURE: PostgreSQL 10 has no FUNCTION there).
PG_TRIGGERS = """
CREATE FUNCTION queuectl_count_update() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO count_deltas (queue, state, n) VALUES (OLD.queue, OLD.state, -1), (NEW.queue, NEW.state, 1);
    RETURN NULL;
END $$;
""" + _PG_COUNT_UPDATE_TRIGGER + """
CREATE FUNCTION queuectl_count_delete() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO count_deltas (queue, state, n) SELECT queue, state, -COUNT(*) FROM gone GROUP BY queue, state;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE PROCEDURE queuectl_count_delete();
"""
#: The tables a queuectl schema has: any of them without queuectl_version
#: belongs to another program.
PG_TABLE_NAMES = ("queuectl_version", "jobs", "queues", "deps", "output", "runs", "workers", "config",
                  "count_base", "count_deltas", "counts")
#: The PostgreSQL schema's version, in queuectl_version (it started at 4, as SQLite's then).
PG_SCHEMA_VERSION = 5
#: PG_MIGRATIONS[v] upgrades a PostgreSQL schema of version v to v + 1.
PG_MIGRATIONS = {
    # 4 -> 5: a worker's result and its next claim write their own count
    # deltas (a trigger call cost more than the rest of the UPDATE), and flip
    # self_counted so that the trigger leaves them out.
    4: """
        ALTER TABLE jobs ADD COLUMN self_counted INTEGER NOT NULL DEFAULT 0;
        DROP TRIGGER jobs_count_update ON jobs;
    """ + _PG_COUNT_UPDATE_TRIGGER,
}
#: Environment variable: 0 makes workers poll instead of LISTEN (needed behind
#: PgBouncer in transaction mode, where LISTEN does not work).
PG_LISTEN_ENV = "QUEUECTL_PG_LISTEN"


def pg_listen_enabled():
    """QUEUECTL_PG_LISTEN: 0 (or false, no, off) for PgBouncer's transaction mode."""
    return os.environ.get(PG_LISTEN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
#: A host's clock this close to the server's is used as it is (see sync_clock).
PG_CLOCK_SLACK = 0.5
#: A statement run this many times on a connection is prepared (see PostgresStore._bind).
PG_PREPARE_AFTER = 3
#: ... and at most this many on a connection (a plan takes the server's memory).
PG_PREPARED_MAX = 100
#: Count deltas a `status` finds before it folds them itself.
PG_FOLD_AT = 10000
#: How often a busy worker folds the count deltas into count_base.
PG_FOLD_SECONDS = 5.0
#: Connection settings queuectl adds unless the URL gives them: fail fast on a
#: host that does not answer, and notice a dead connection within seconds (a
#: worker must, to stop its job before its lease runs out).
PG_CONNECT_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "5",
                       "keepalives_interval": "2", "keepalives_count": "3", "tcp_user_timeout": "5000",
                       "application_name": "queuectl"}
#: A statement of a CLI call (not of a worker: see Worker._lease_watch) that
#: has had no answer for this long makes queuectl try a new connection, with
#: this connect_timeout: if that fails too, nothing answers (a frozen proxy,
#: a paused server, which keep the TCP connection up), and the call fails
#: in one line; if it connects, the statement is only slow: look again later.
PG_ANSWER_SECONDS = 5.0
#: Job states whose SQLSTATE means "run the transaction again" (serialization failure, deadlock).
PG_RETRY_STATES = ("40001", "40P01")


class _PgRow(tuple):
    """A row read from PostgreSQL, by index or by column name (as sqlite3.Row)."""

    def __new__(cls, values, index):
        row = tuple.__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key):
        return tuple.__getitem__(self, self._index[key] if isinstance(key, str) else key)

    def keys(self):
        return list(self._index)


class _PgCursor:
    """What Store's shared code uses of a cursor: rowcount, fetchall, fetchone."""

    #: {statement: {column name: index}}: reading a cursor's description
    #: costs more than the rest of a short statement's handling.
    _names = {}

    def __init__(self, cursor, sql=None):
        self.rowcount = -1 if cursor is None else cursor.rowcount     # None: a deferred statement
        self._cursor = cursor
        self._sql = sql

    def fetchall(self):
        cursor = self._cursor
        if cursor is None:
            return []
        index = self._names.get(self._sql)
        if index is None:
            if cursor.description is None:
                return []
            index = {d[0]: i for i, d in enumerate(cursor.description)}
            if self._sql is not None and len(self._names) < 1000:
                self._names[self._sql] = index
        return [_PgRow(r, index) for r in cursor.fetchall()]

    def fetchone(self):
        rows = self.fetchall()
        return rows[0] if rows else None


class _PgDriver:
    """psycopg 3, else psycopg2, imported only when a PostgreSQL URL is used:
    the few things Store needs of either (connect, execute with %s
    placeholders, notifications, SQLSTATE)."""

    _loaded = None

    @classmethod
    def load(cls):
        if cls._loaded is None:
            cls._loaded = cls()
        return cls._loaded

    def __init__(self):
        try:
            import psycopg
            self.v3, self.module = True, psycopg
        except ImportError:
            try:
                import psycopg2
                import psycopg2.extensions
                import psycopg2.extras
                self.v3, self.module = False, psycopg2
            except ImportError:
                raise StoreError("a postgresql:// database needs the psycopg driver: pip install "
                                 "'psycopg[binary]' (or, on Debian/Ubuntu, apt install python3-psycopg2)")
        self.Error = self.module.Error
        self.IntegrityError = self.module.IntegrityError
        #: Can a batch end with COMMIT and still give an earlier statement's rows?
        self.pipelines = self.v3

    def parse(self, url):
        """The URL's settings as a dict (raises the driver's error if malformed)."""
        if self.v3:
            from psycopg.conninfo import conninfo_to_dict
            return conninfo_to_dict(url)
        return self.module.extensions.parse_dsn(url)

    def connect(self, url, **override):
        given = self.parse(url)
        extra = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in given}
        extra.update(override)
        if self.v3:
            # Client-side binding, as psycopg2 does: a batch of statements is
            # one simple query, one message each way. (Server-side binding in
            # pipeline mode cost 4x the client CPU and 2.5x the server's for
            # a batch of 8; PostgresStore prepares its frequent statements
            # itself, with PREPARE and EXECUTE.)
            conn = self.module.connect(url, autocommit=True, cursor_factory=self.module.ClientCursor, **extra)
            conn.prepare_threshold = None       # a ClientCursor never prepares: skip psycopg's bookkeeping
            return conn
        conn = self.module.connect(url, **extra)
        conn.autocommit = True
        return conn

    def _bound(self, conn, sql, params):
        """psycopg 3: the statement with its parameters bound here, as bytes
        (their literals as psycopg's ClientCursor writes them: half its cost)."""
        try:
            encoding, literal = conn._queuectl_literal
        except AttributeError:
            encoding, literal = conn._queuectl_literal = (
                conn.info.encoding, self.module.adapt.Transformer(conn).as_literal)
        if params is None:
            return sql.encode(encoding)
        if isinstance(params, dict):
            return conn.cursor().mogrify(sql, params).encode(encoding)
        return sql.encode(encoding) % tuple([literal(value) for value in params])

    def execute(self, conn, sql, params):
        if self.v3:
            return _PgCursor(conn.execute(self._bound(conn, sql, params)), sql)
        if len(conn.notifies) > 1:
            del conn.notifies[1:]       # one says "notified"; a busy worker must not pile them up
        cursor = conn.cursor()
        cursor.execute(sql, params)
        return _PgCursor(cursor, sql)

    def execute_batch(self, conn, statements, keep=-1):
        """Several statements in one round trip, as one simple query with the
        parameters bound here; the cursor of statements[keep] (psycopg2 gives
        only the last statement's)."""
        cursor = conn.cursor()
        if self.v3:
            cursor.execute(b";\n".join([self._bound(conn, sql, params) for sql, params in statements]))
            for _ in range(keep % len(statements)):
                cursor.nextset()
        else:
            if len(conn.notifies) > 1:
                del conn.notifies[1:]
            cursor.execute(b";\n".join(sql.encode() if params is None else cursor.mogrify(sql, params)
                                        for sql, params in statements))
        return _PgCursor(cursor, statements[keep][0])

    def executemany(self, conn, sql, rows):
        if self.v3:
            # Server-side binding here: psycopg pipelines the rows.
            with self.module.Cursor(conn) as cursor:
                cursor.executemany(sql, rows)
        else:
            with conn.cursor() as cursor:
                self.module.extras.execute_batch(cursor, sql, rows, page_size=500)

    def in_transaction(self, conn):
        status = conn.info.transaction_status if self.v3 else conn.get_transaction_status()
        return status != 0      # IDLE in both

    def sqlstate(self, error):
        return getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)

    def broken(self, conn):
        return conn is None or (conn.closed if self.v3 else conn.closed != 0) or (
            self.v3 and conn.info.status != self.module.pq.ConnStatus.OK)

    def listen(self, conn, store):
        """Note notifications that arrive along with query results (the socket
        is then no longer readable: waker() must not wait for it)."""
        if self.v3:
            conn.add_notify_handler(lambda n: setattr(store, "_notified", True))

    def notified(self, conn, store):
        return store._notified if self.v3 else bool(conn.notifies)

    def read_notifies(self, conn):
        """Read what the server sent meanwhile and drop its notifications
        (they only wake; what changed is read by the due check)."""
        if self.v3:
            pgconn = conn.pgconn
            pgconn.consume_input()
            while pgconn.notifies() is not None:
                pass
        else:
            conn.poll()
            del conn.notifies[:]


class _PgWaker:
    """PostgresStore.waker(): the interface of WakeFifo over LISTEN/NOTIFY."""

    def __init__(self, store):
        self.store = store

    def fileno(self):
        store = self.store
        if store._idle_pipe is None:
            store._idle_pipe = os.pipe()
            for fd in store._idle_pipe:
                os.set_blocking(fd, False)
        if store._listen and store.conn is not None and not store._pg.broken(store.conn):
            if not store._pg.notified(store.conn, store):
                return store.conn.fileno()
            # Read along with the due check's results: the socket will not
            # say so, the pipe does.
            try:
                os.write(store._idle_pipe[1], b".")
            except BlockingIOError:
                pass
        return store._idle_pipe[0]

    def nudges(self):
        """Do commits nudge this? Only while we LISTEN (not with QUEUECTL_PG_LISTEN=0)."""
        return bool(self.store._listen)

    def drain(self, size=None):
        store = self.store
        if store._idle_pipe is not None:
            _drain(store._idle_pipe[0])
        if store._listen and store.conn is not None:
            store._notified = False
            try:
                store._pg.read_notifies(store.conn)
            except store._pg.Error:
                pass        # a lost connection: the next query reconnects

    def close(self):
        pass        # the connection stays; the pipe goes with the store


def _retried(method):
    """Run a Store method (one transaction) again when PostgreSQL gave it up
    for a deadlock or a serialization failure: the rollback undid it whole."""
    def run(self, *args, **kwargs):
        for attempt in range(10):
            try:
                return method(self, *args, **kwargs)
            except _Conflict:
                if attempt == 9:
                    raise
                time.sleep(0.001 * 2 ** attempt * (0.5 + os.urandom(1)[0] / 255.0))
    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


class PostgresStore(Store):
    """The same store on a PostgreSQL database, shared by workers on many hosts.

    What differs from SQLite: transactions are READ COMMITTED, so the rows a
    transaction changes on the strength of what it read are locked (FOR
    UPDATE); the claim skips rows other claims hold (SKIP LOCKED) and locks a
    limited queue's row; every time compared comes from the server's clock
    (the offset is measured at connect and on each heartbeat); idle workers
    LISTEN and transactions that make work due NOTIFY, once each; counts are
    insert-only deltas. One connection a process; workers reconnect, a CLI
    call fails in one line. The URL's password is never shown (self.path is
    the redacted URL).
    """

    _LOCK = " FOR UPDATE"
    _SHARE = " FOR SHARE"
    REBOOT_PROVES_DEATH = False
    _SET_CONFIG = """
        INSERT INTO config (key, value) VALUES (?, ?)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value"""
    _ADD_DEPS = "INSERT INTO deps (job_id, after_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
    _SELF_COUNTED = ", self_counted = 1 - self_counted"
    _REGISTER = """
        INSERT INTO workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at)
        VALUES (?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (id) DO UPDATE
        SET host = excluded.host, boot_id = excluded.boot_id, pid = excluded.pid,
            pid_start = excluded.pid_start, started_at = excluded.started_at,
            heartbeat_at = excluded.heartbeat_at, stop_requested = 0"""
    change_poll_seconds = 0.1

    def __init__(self, url, durable=True, busy_timeout=None, create=True, listen=False):
        self.url = url
        self.path = redact_url(url)
        self.conn = None
        self.missing = None
        self._wal_path = None
        self.busy_timeout = busy_timeout_setting() if busy_timeout is None else busy_timeout
        self._durable = durable
        self._listen = listen and pg_listen_enabled()
        self._channel = None
        self._wake = 0              # this transaction NOTIFYs at commit if not 0
        self._limited = None        # queues with a limit, as the last claim saw them (None: not known)
        self._claim_again = False   # the claim found a queue with a limit: claim on the full path
        self._deltas = None         # (queue, state) of the job _settle moved, its count not yet written
        self._notified = False      # a notification came with a query's results (psycopg 3)
        self._idle_pipe = None      # see _PgWaker
        self._in_transaction = False
        self._committed = False
        self._queue = []            # statements sent with the next one (see _defer)
        self._deferring = False     # writes in _settle are deferred
        self._sql_cache = {}
        self._prepared = {}         # {statement: its EXECUTE} on this connection (see _bind)
        self._uses = None           # {statement: times run} on this connection, None: prepare nothing
        self._to_prepare = []
        self._folded_at = 0.0
        self._now_given = False     # see Store.claim
        self._secrets = url_secrets(url)     # cut out of every error text (_text)
        self._fd = None             # the connection's socket, for interrupt()
        # A CLI call's statements are watched (PG_ANSWER_SECONDS); a worker's
        # are not, it watches its job's lease instead (Worker._lease_watch).
        self._watch = None if listen else _Watchdog(tick=0.5)
        self._asked_at = 0.0        # when the watched statement was sent
        self._hung = None           # why the watchdog broke the connection
        self._pg = _PgDriver.load()
        try:
            self._pg.parse(url)
        except self._pg.Error as e:
            raise StoreError("invalid database URL %s: %s" % (self.path, self._text(e)))
        self._connect(create)

    def location(self):
        return self.path        # the URL without its password

    def check_writable(self):
        row = self._one("""
            SELECT current_user, ARRAY(SELECT t FROM unnest(ARRAY['jobs', 'runs', 'workers', 'output']) AS t
                                       WHERE NOT has_table_privilege(t, 'INSERT, UPDATE, DELETE'))""")
        if row[1]:
            raise StoreError("cannot write database %s: role %s may not write table %s"
                             % (self.path, row[0], row[1][0]))

    # -- connection and schema ------------------------------------------------

    def _text(self, error):
        """A driver error as one line, without the password."""
        text = " ".join(str(error).split()) or type(error).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _connect(self, create=True):
        try:
            self.conn = self._pg.connect(self.url)
        except self._pg.Error as e:
            raise StoreError("cannot connect to %s: %s" % (self.path, self._text(e)))
        self._fd = self.conn.fileno()
        # Prepared statements belong to a session: behind PgBouncer in
        # transaction mode (what QUEUECTL_PG_LISTEN=0 is for) the next
        # transaction may run on another server connection that lacks them.
        self._prepared, self._to_prepare = {}, []
        self._uses = {} if pg_listen_enabled() else None
        try:
            # A session that vanishes mid-transaction (a host cut off) must
            # not hold its locks for long; workers need not wait for fsync.
            self._execute("SET lock_timeout = %d; SET idle_in_transaction_session_timeout = 60000%s" % (
                int(self.busy_timeout * 1000), "" if self._durable else "; SET synchronous_commit = off"))
            # Every table and view of the schema (queuectl's and any other program's).
            row = self._one("""
                SELECT current_schema(), current_setting('search_path'),
                       ARRAY(SELECT c.relname::TEXT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f'))""")
            schema, search_path, tables = row[0], row[1], set(row[2])
            if "queuectl_version" in tables:
                version = self._one("SELECT version FROM queuectl_version")
                if version is None or not isinstance(version[0], int) \
                        or (version[0] < PG_SCHEMA_VERSION and version[0] not in PG_MIGRATIONS):
                    raise StoreError("database %s is damaged: its queuectl_version table holds %s, not a "
                                     "schema version" % (self.path, "no row" if version is None else version[0]))
                if version[0] != PG_SCHEMA_VERSION:
                    self._upgrade(version[0])
            elif tables:
                # Ours without the version (a half-made schema cannot be: it is one
                # transaction) or another program's: leave it alone.
                others = sorted(tables - set(PG_TABLE_NAMES)) or sorted(tables)
                raise StoreError("%s is not a queuectl database: its schema %s has a table %s of another "
                                 "program; give queuectl a schema of its own (add ?options=-csearch_path%%3Dqueuectl "
                                 "to the URL)" % (self.path, schema, others[0]))
            elif create:
                schema = self._create_schema(search_path)
            else:
                # Reading a queue that was never written: read an empty one
                # (temporary tables), so that `status` writes nothing.
                self.missing = self.path
                self._execute("SET search_path = pg_temp")
                self._execute(PG_TABLES)
            self._channel = '"qc_%s"' % _md5_hex(schema or "")[:16]
            self.sync_clock()
            if self._listen:
                self._pg.listen(self.conn, self)
                self._execute("LISTEN " + self._channel)
        except BaseException:
            self.close()
            raise

    def _create_schema(self, search_path):
        """Create the tables on first write, in the first schema of the
        search_path (created if missing), under an advisory lock: two
        processes starting at once on a new database create them once."""
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(hashtext('queuectl ' || current_setting('search_path')))")
            schema = self._one("SELECT current_schema()")[0]
            if schema is None:
                first = search_path.split(",")[0].strip()
                if first == '"$user"':
                    first = self._one("SELECT session_user")[0]
                first = first.strip('"')
                self._execute('CREATE SCHEMA IF NOT EXISTS "%s"' % first.replace('"', '""'))
                schema = self._one("SELECT current_schema()")[0]
                if schema is None:
                    raise StoreError("%s: no schema to create the tables in (search_path is %s)"
                                     % (self.path, search_path))
            if self._one("SELECT to_regclass('queuectl_version')")[0] is None:
                self._execute(PG_TABLES)
                self._execute(PG_TRIGGERS)
                self._execute("INSERT INTO queuectl_version (version) VALUES (%d)" % PG_SCHEMA_VERSION)
            return schema

    def _upgrade(self, version):
        if version > PG_SCHEMA_VERSION:
            raise StoreError("database %s was written by a newer queuectl (schema %d, this is %d); "
                             "upgrade queuectl" % (self.path, version, PG_SCHEMA_VERSION))
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(hashtext('queuectl ' || current_setting('search_path')))")
            version = self._one("SELECT version FROM queuectl_version")[0]
            while version < PG_SCHEMA_VERSION:
                self._execute(PG_MIGRATIONS[version])
                version += 1
            self._execute("UPDATE queuectl_version SET version = %d" % version)

    def close(self):
        self._fd = None
        if self._watch is not None:
            self._watch.stop()
        if self.conn is not None:
            try:
                self.conn.close()
            except self._pg.Error:
                pass
            self.conn = None
        if self._idle_pipe is not None:
            for fd in self._idle_pipe:
                os.close(fd)
            self._idle_pipe = None

    def _reconnect(self):
        """After a lost connection (workers ride it out; a CLI call has
        already failed): connect again, and LISTEN again."""
        self.close()
        self._connect()

    def interrupt(self):
        """From another thread (a _Watchdog): end the statement under way
        with an error, whatever the server does: shut the connection's socket
        down, so that the driver's wait for an answer ends at once. The
        connection is then broken; a worker connects again."""
        import socket
        fd = self._fd
        if fd is None:
            return
        try:
            dup = os.dup(fd)
        except OSError:
            return
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()

    def _probe(self):
        """The watchdog's action when a statement has had no answer for
        PG_ANSWER_SECONDS: can a new connection be made? If not, nothing
        answers: break this one (the statement fails, saying why). If so, the
        statement is only slow (a lock wait, a big purge): look again later."""
        armed = self._watch._armed
        try:
            self._pg.connect(self.url, connect_timeout=str(int(PG_ANSWER_SECONDS))).close()
        except self._pg.Error as e:
            if self._watch._armed != armed:
                return None     # the statement was answered meanwhile
            self._hung = "no answer for %.0fs, and a new connection failed too (%s)" % (
                time.monotonic() - self._asked_at, self._text(e))
            self.interrupt()
            return None
        return time.monotonic() + PG_ANSWER_SECONDS

    # -- statements -------------------------------------------------------------

    def _sql(self, sql, has_params, named=False):
        """Store's SQL in PostgreSQL's words: %s placeholders, no INDEXED BY, strpos for instr."""
        key = (sql, has_params, named)
        text = self._sql_cache.get(key)
        if text is None:
            import re
            text = re.sub(r"\s+INDEXED BY \w+", "", sql)
            text = text.replace("instr(", "strpos(")
            if has_params:
                text = text.replace("%", "%%")
                text = re.sub(r" IS \?", " IS NOT DISTINCT FROM ?", text)
                if named:
                    text = re.sub(r"(?<!:):([a-z_]+)\b", r"%(\1)s", text)
                text = text.replace("?", "%s")
            self._sql_cache[key] = text
        return text

    def _bind(self, sql, params):
        """The statement as sent: (text with %s placeholders, params or None).
        One this connection has prepared goes as EXECUTE of it: a prepared
        statement skips the server's parse and plan, most of a short
        statement's cost. One run PG_PREPARE_AFTER times is prepared before
        the next transaction begins (see _prepare_pending)."""
        named = isinstance(params, dict)
        text = self._sql(sql, bool(params), named)
        if not params or named or self._uses is None:
            return text, params or None
        execute = self._prepared.get(text)
        if execute is not None:
            return execute, params
        uses = self._uses.get(text, 0) + 1
        if uses <= PG_PREPARE_AFTER and len(self._uses) < 1000:
            self._uses[text] = uses
            if uses == PG_PREPARE_AFTER and len(self._prepared) + len(self._to_prepare) < PG_PREPARED_MAX:
                self._to_prepare.append(text)
        return text, params

    def _prepare_pending(self):
        """PREPARE the statements _bind found frequent, one by one, outside any
        transaction. One PostgreSQL cannot prepare (a parameter whose type it
        cannot tell) is sent as it is from then on. None in the list: first
        DEALLOCATE ALL (see _error)."""
        import re
        todo, self._to_prepare = self._to_prepare, []
        for text in todo:
            if text is None:
                try:
                    self._pg.execute(self.conn, "DEALLOCATE ALL", None)
                except self._pg.Error as e:
                    if self._pg.broken(self.conn):
                        raise self._error(e)
                continue
            name = "queuectl_" + _md5_hex(text)[:16]
            numbers = iter(range(1, len(text)))
            body = re.sub(r"%%|%s", lambda m: "%" if m.group() == "%%" else "$%d" % next(numbers), text)
            count = next(numbers) - 1
            try:
                self._pg.execute(self.conn, "PREPARE %s AS %s" % (name, body), None)
            except self._pg.Error as e:
                if self._pg.broken(self.conn):
                    raise self._error(e)
                continue
            self._prepared[text] = "EXECUTE %s (%s)" % (name, ", ".join(["%s"] * count))

    @contextlib.contextmanager
    def _errors(self, params=(), collide=False):
        watch = self._watch
        if watch is not None:
            self._asked_at, self._hung = time.monotonic(), None
            watch.arm(self._asked_at + PG_ANSWER_SECONDS, self._probe)
        try:
            yield
        except self._pg.Error as e:
            if collide and isinstance(e, self._pg.IntegrityError):
                raise _Collision()
            raise self._error(e)
        except UnicodeEncodeError:
            raise _not_utf8(params)
        finally:
            if watch is not None:
                watch.disarm()

    def _execute(self, sql, params=()):
        """Run a statement. Statements queued by _defer go first, in the same
        round trip: a round trip costs more than most of our statements."""
        if self.conn is None or (not self._in_transaction and self._pg.broken(self.conn)):
            self._reconnect()
        if params:
            if isinstance(params, dict):
                params = {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
            else:
                params = [int(v) if isinstance(v, bool) else v for v in params]
        if self._deferring and sql.lstrip().startswith(("UPDATE", "DELETE", "INSERT")):
            return self._defer(sql, params)
        with self._errors(params):
            if self._to_prepare and not self._in_transaction and not self._pg.in_transaction(self.conn):
                self._prepare_pending()
            text, params = self._bind(sql, params)
            if self._queue:
                queue, self._queue = self._queue + [(text, params)], []
                return self._pg.execute_batch(self.conn, queue)
            return self._pg.execute(self.conn, text, params)

    def _execute_last(self, sql, params=()):
        """The transaction's last statement, with COMMIT (and its NOTIFY) in the
        same round trip where the driver can (psycopg 3)."""
        self._flush_deltas()
        if not (self._in_transaction and self._pg.pipelines):
            return self._execute(sql, params)
        statements = self._queue + [self._bind(sql, params)]
        if self._wake:
            statements.append(("NOTIFY " + self._channel, None))
        statements.append(("COMMIT", None))
        self._queue = []
        with self._errors(params):
            cursor = self._pg.execute_batch(self.conn, statements, keep=-2 - bool(self._wake))
        self._committed = True
        return cursor

    def _defer(self, sql, params=()):
        """Queue a statement whose result nobody reads, for the next _execute
        (errors surface there, still inside the transaction)."""
        self._queue.append(self._bind(sql, params))
        return _PgCursor(None)

    def _executemany(self, sql, rows, collide=False):
        if not rows:
            return
        if self._queue:
            self._execute("SELECT 1")
        with self._errors([value for row in rows for value in row], collide):
            self._pg.executemany(self.conn, self._sql(sql, True), rows)

    def _all(self, sql, params=()):
        return self._execute(sql, params).fetchall()

    def _error(self, e):
        state = self._pg.sqlstate(e)
        text = self._text(e)
        if state in PG_RETRY_STATES:
            return _Conflict("database %s: %s" % (self.path, text))
        if state == "0A000" and self._prepared:
            # "cached plan must not change result type": another process
            # changed a table (an upgrade) under one of our prepared
            # statements. Prepare them again (a _retried method runs again).
            self._prepared, self._to_prepare, self._uses = {}, [None], {}
            return _Conflict("database %s: %s" % (self.path, text))
        if self._pg.broken(self.conn):
            self.close()
            if self._hung:
                text, self._hung = self._hung, None
            return StoreError("lost the connection to %s: %s" % (self.path, text))
        if state == "55P03":
            return StoreError("database %s is locked: a row has been held for more than %gs; try again "
                              "(QUEUECTL_BUSY_TIMEOUT sets the wait)" % (self.path, self.busy_timeout))
        if state in ("42501", "25006"):
            return StoreError("cannot write database %s: %s" % (self.path, text))
        if state in ("53100", "53200"):
            return StoreError("cannot write database %s: the server is out of space; nothing was changed"
                              % self.path)
        return StoreError("database %s: %s" % (self.path, text))

    @contextlib.contextmanager
    def transaction(self, wait=None):
        """BEGIN ... COMMIT (READ COMMITTED); ROLLBACK on any exception. With
        `wait`, a row lock is waited for at most that long. NOTIFY once,
        just before COMMIT, if the transaction made work claimable or asked a
        stop (self._wake: see WakeFifo, which SQLite uses instead)."""
        self._wake = 0
        self._committed = False     # by _execute_last
        if self.conn is None or self._pg.broken(self.conn):
            self._reconnect()
        if self._to_prepare and not self._pg.in_transaction(self.conn):
            with self._errors():
                self._prepare_pending()
        # BEGIN goes with the first statement, NOTIFY with COMMIT.
        self._queue = [("BEGIN", None)]
        if wait is not None:
            self._queue.append(("SET LOCAL lock_timeout = %d" % int(wait * 1000), None))
        self._in_transaction = True
        try:
            yield
            if not self._committed:
                self._flush_deltas()
                if self._wake:
                    self._defer("NOTIFY " + self._channel)
                self._execute("COMMIT")
        except BaseException:
            begun = not self._queue or self._queue[0][0] != "BEGIN"
            self._queue = []
            if begun and self.conn is not None and not self._pg.broken(self.conn):
                try:
                    self._pg.execute(self.conn, "ROLLBACK", None)
                except self._pg.Error:
                    self.close()
            raise
        finally:
            self._queue = []
            self._deltas = None
            self._deferring = False
            self._in_transaction = False

    @contextlib.contextmanager
    def snapshot(self):
        """Reads inside see one state of the database."""
        self._execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._in_transaction = True
        try:
            yield
        finally:
            self._in_transaction = False
            if self.conn is not None:
                self._execute("COMMIT")

    def abandon(self):
        if self.conn is not None and not self._pg.broken(self.conn) and self._pg.in_transaction(self.conn):
            try:
                self._pg.execute(self.conn, "ROLLBACK", None)
            except self._pg.Error:
                self.close()

    def data_version(self):
        """A number that moves when any transaction that wrote has started since."""
        return self._one("SELECT txid_snapshot_xmax(txid_current_snapshot())")[0]

    def wal_size(self):
        return 0        # PostgreSQL's own checkpoints keep its WAL

    def truncate_wal(self, wait=0.1):
        return True

    # -- clock, wake-up ---------------------------------------------------------

    def sync_clock(self):
        """Measure the server's clock against ours (one query): now() is the
        server's time, so hosts whose clocks disagree agree on due times and
        leases."""
        before = time.time()
        server = self._one("SELECT extract(epoch FROM clock_timestamp())::FLOAT8")[0]
        after = time.time()
        offset = server - (before + after) / 2
        # Clocks within PG_CLOCK_SLACK are taken as one (NTP keeps hosts far
        # closer): times given by a caller then stay exactly as given.
        self.clock_offset = offset if abs(offset) >= PG_CLOCK_SLACK else 0.0

    def waker(self):
        """What an idle worker waits on: this connection's socket, readable
        when a NOTIFY arrives (LISTEN), else a pipe nothing writes to, so that
        the worker polls every IDLE_CLAIM_SECONDS (QUEUECTL_PG_LISTEN=0)."""
        return _PgWaker(self)

    # -- what PostgreSQL does its own way -----------------------------------------

    def submit(self, jobs, now=None):
        # A `now` the caller read from this host's clock moves onto the
        # server's (a delay counts from it); a time given as such (--run-at)
        # is an instant, and stays.
        if now is not None:
            now += self.clock_offset
        return Store.submit(self, jobs, now)

    def _add_queue(self, name):
        self._execute("INSERT INTO queues (name) VALUES (?) ON CONFLICT DO NOTHING", (name,))

    def _settle(self, job, run, outcome, exit_code, ok, now, *args, **kwargs):
        # Store._settle wakes idle workers for every finished run, in case it
        # freed a slot of a limited queue. A NOTIFY takes a lock at commit and
        # wakes every listener: here only where a slot or a due job matters.
        wake = self._wake
        self._deferring = True      # its writes go with the next read (or COMMIT)
        try:
            state, run_at = Store._settle(self, job, run, outcome, exit_code, ok, now, *args, **kwargs)
            # The job was processing (its row is locked): its UPDATE flipped
            # self_counted, and its count moves with the next claim's (see
            # _claim_unlimited) or before COMMIT, with no trigger call.
            self._flush_deltas()
            self._deltas = (job["queue"], state)
        finally:
            self._deferring = False
        if self._wake == wake + 1 and self._limited is not None and job["queue"] not in self._limited \
                and not (state in DUE_STATES and run_at <= now):
            self._wake = wake
        return state, run_at

    def _flush_deltas(self):
        """Write the count deltas of the job _settle moved (if not yet written)."""
        if self._deltas is not None:
            queue, state = self._deltas
            self._deltas = None
            self._defer("INSERT INTO count_deltas (queue, state, n) VALUES (?, 'processing', -1), (?, ?, 1)",
                        (queue, queue, state))

    def _count_added(self, added):
        self._executemany("INSERT INTO count_deltas (queue, state, n) VALUES (?, ?, ?)",
                          [(queue, state, n) for (queue, state), n in sorted(added.items())])

    def fold_counts(self):
        """Add the count deltas into count_base and delete them, in one
        transaction, by one process at a time (the others skip)."""
        with self.transaction():
            if not self._one("SELECT pg_try_advisory_xact_lock(hashtext('queuectl counts ' || current_schema()))")[0]:
                return
            self._execute("""
                WITH gone AS (DELETE FROM count_deltas RETURNING queue, state, n)
                INSERT INTO count_base (queue, state, n)
                SELECT queue, state, SUM(n) FROM gone GROUP BY queue, state ORDER BY queue, state
                ON CONFLICT (queue, state) DO UPDATE SET n = count_base.n + excluded.n""")
        self._folded_at = time.monotonic()

    def counts(self):
        if self.missing is None and time.monotonic() - self._folded_at > PG_FOLD_SECONDS:
            many = self._one("SELECT COUNT(*) FROM (SELECT 1 FROM count_deltas LIMIT ?) AS d", (PG_FOLD_AT,))[0]
            if many >= PG_FOLD_AT:
                try:
                    self.fold_counts()
                except StoreError:
                    pass    # a read-only role: the sums are right anyway, only slower
        return Store.counts(self)

    def heartbeat(self, worker_id, job_id=None, now=None, lease=LEASE_SECONDS, stopping=False):
        self.sync_clock()
        beat = Store.heartbeat(self, worker_id, job_id, now, lease, stopping)
        if time.monotonic() - self._folded_at > PG_FOLD_SECONDS:
            try:
                self.fold_counts()
            except StoreError:
                pass
        return beat

    def _held(self, job_id, worker_id):
        # Lock first: the read after it (a statement of its own, so a later
        # snapshot; same round trip) then sees deps rows that an enqueue
        # holding our row FOR SHARE committed meanwhile.
        self._defer("SELECT 1 FROM jobs WHERE id = ? AND state = 'processing' AND worker_id = ? FOR UPDATE",
                    (job_id, worker_id))
        return Store._held(self, job_id, worker_id)

    #: Due waiting jobs marked ready, skipping rows another claim is promoting.
    #: The claim's common part, after a CTE `head` (seq, state, queue) that
    #: picked the job: take it (worker_id, lease_until, updated_at) and open its run.
    _TAKE_HEAD = """            claimed AS (
                UPDATE jobs
                SET state = 'processing', ready = 0, attempts = attempts + 1, run_count = run_count + 1,
                    worker_id = ?, lease_until = ?, updated_at = ?, self_counted = 1 - self_counted
                FROM head
                WHERE jobs.seq = head.seq
                RETURNING jobs.*),
            opened AS (
                INSERT INTO runs (job_id, run, attempt, worker_id, started_at)
                SELECT id, run_count, attempts, worker_id, updated_at FROM claimed),"""

    _PROMOTE = """
        UPDATE jobs SET ready = 1
        WHERE seq IN (SELECT seq FROM jobs
                      WHERE %s
                      ORDER BY run_at
                      LIMIT 1000
                      FOR UPDATE SKIP LOCKED)""" % Store._WAITING_DUE

    def _promote(self, now):
        self._execute(self._PROMOTE, (now,))

    def _claim(self, worker_id, now, lease, queues=None):
        """The body of claim(). While the last claim saw no queue with a limit,
        _claim_unlimited(). Otherwise two statements where no queue has a limit
        (a round trip is most of a claim's cost): (1) promote due waiting
        jobs, read whether we are asked to stop and which queues we may take
        from (not paused, with ready jobs); (2) take the head of each of those
        queues that no other claim holds (SKIP LOCKED), the best of them, with
        UPDATE ... RETURNING, and open its run. A queue with a limit: its row
        is locked (in name order) and its running jobs counted after the lock,
        so that the limit holds across hosts. "Has ready jobs" is a scalar
        subquery with LIMIT 1, one probe of jobs_ready per queue: an EXISTS
        would be planned as a semi-join over every ready row whenever the
        statistics (stale after a burst of due jobs) say there are few (8.8 ms
        instead of 0.08 ms at 1M jobs)."""
        served, params = self._served(queues)
        if self._limited == set():
            return self._claim_unlimited(worker_id, now, lease, served, params)
        stop, names, limited = self._one("""
            WITH promoted AS (%s RETURNING queue)
            SELECT (SELECT stop_requested FROM workers WHERE id = ?),
                   ARRAY(SELECT q.name FROM queues q
                         WHERE q.paused = 0 %s
                           AND ((SELECT 1 FROM jobs WHERE ready = 1 AND queue = q.name LIMIT 1) IS NOT NULL
                                OR q.name IN (SELECT queue FROM promoted))
                         ORDER BY q.name),
                   ARRAY(SELECT q.name FROM queues q WHERE q.max_running IS NOT NULL)""" % (self._PROMOTE, served),
                                            (now, worker_id) + params)
        self._limited = set(limited)
        if (stop or 0) & STOP_ASKED or not names:
            return None
        limited = [n for n in names if n in self._limited]
        if limited:
            limits = dict(self._all("""
                SELECT name, max_running FROM queues
                WHERE name = ANY(?) AND max_running IS NOT NULL
                ORDER BY name
                FOR UPDATE""", (limited,)))
            running = dict(self._all("""
                SELECT queue, COUNT(*) FROM jobs
                WHERE state = 'processing' AND queue = ANY(?)
                GROUP BY queue""", (list(limits),)))
            names = [n for n in names if n not in limits or running.get(n, 0) < limits[n]]
            if not names:
                return None
            if not self._now_given:
                # The run starts now that we hold the queue: the time read
                # before may be older than the result that freed the slot.
                now = self.now()
        if len(names) == 1:
            # The usual case, one queue: its head, straight from jobs_ready.
            # Its generic plan is as good as any, so PostgreSQL plans it once
            # a connection; the best of the heads of an unnest()ed list is
            # planned again at every claim (the planner's guess of the list's
            # length makes a generic plan look dearer), which cost more than
            # running it.
            head = """
                SELECT seq, state, queue FROM jobs
                WHERE ready = 1 AND queue = ?
                ORDER BY priority DESC, run_at, seq
                LIMIT 1
                FOR UPDATE SKIP LOCKED"""
            names = names[0]
        else:
            head = """
                SELECT h.seq, h.state, h.queue FROM unnest(?::TEXT[]) AS q(name)
                CROSS JOIN LATERAL (SELECT seq, priority, run_at, state, queue FROM jobs
                                    WHERE ready = 1 AND queue = q.name
                                    ORDER BY priority DESC, run_at, seq
                                    LIMIT 1
                                    FOR UPDATE SKIP LOCKED) AS h
                ORDER BY h.priority DESC, h.run_at, h.seq
                LIMIT 1"""
        job = self._execute_last("""
            WITH head AS (%s),
%s
            counted AS (
                INSERT INTO count_deltas (queue, state, n)
                SELECT queue, state, -1 FROM head UNION ALL SELECT queue, 'processing', 1 FROM head)
            SELECT * FROM claimed""" % (head, self._TAKE_HEAD), (names, worker_id, now + lease, now)).fetchone()
        if job is None:
            return None
        job = dict(zip(job.keys(), job))
        job["run"] = job["run_count"]
        return job

    def _claim_unlimited(self, worker_id, now, lease, served, params):
        """_claim() while the last claim saw no queue with a limit: the
        promotion of due waiting jobs goes with the statements before it (its
        ready jobs are seen by the next statement), and a single statement
        takes the best head of the queues we serve that are not paused and
        opens its run, unless a queue has a limit now (then it takes nothing,
        and the next claim, on the full path, is the one that counts) or we
        were asked to stop. A busy worker's result and next claim are then
        two round trips. Its generic plan is as good as any: it is planned
        once a connection."""
        self._defer(self._PROMOTE, (now,))
        settled, self._deltas = self._deltas or (None, None), None
        row = self._execute_last("""
            WITH head AS (
                SELECT h.seq, h.state, h.queue FROM queues q
                CROSS JOIN LATERAL (SELECT seq, priority, run_at, state, queue FROM jobs
                                    WHERE ready = 1 AND queue = q.name
                                    ORDER BY priority DESC, run_at, seq
                                    LIMIT 1
                                    FOR UPDATE SKIP LOCKED) AS h
                WHERE q.paused = 0 %s
                  AND NOT EXISTS (SELECT 1 FROM queues WHERE max_running IS NOT NULL)
                  AND NOT EXISTS (SELECT 1 FROM workers WHERE id = ? AND stop_requested & %d <> 0)
                ORDER BY h.priority DESC, h.run_at, h.seq
                LIMIT 1),
%s
            counted AS (
                INSERT INTO count_deltas (queue, state, n)
                SELECT queue, state, SUM(n) FROM (
                    SELECT queue, state, -1 AS n FROM head
                    UNION ALL SELECT queue, 'processing', 1 FROM head
                    UNION ALL SELECT ?::TEXT, 'processing', -1
                    UNION ALL SELECT ?::TEXT, ?::TEXT, 1) AS d
                WHERE queue IS NOT NULL
                GROUP BY queue, state
                HAVING SUM(n) <> 0)
            SELECT EXISTS (SELECT 1 FROM queues WHERE max_running IS NOT NULL) AS limited_, claimed.*
            FROM (SELECT 1) AS one LEFT JOIN claimed ON TRUE""" % (served, STOP_ASKED, self._TAKE_HEAD),
                                 params + (worker_id, worker_id, now + lease, now,
                                           settled[0], settled[0], settled[1])).fetchone()
        job = dict(zip(row.keys(), row))    # (dict(row) looks each name up)
        if job.pop("limited_"):
            self._limited = None        # the next claim reads the limits
            self._claim_again = True
        if job["seq"] is None:
            return None
        job["run"] = job["run_count"]
        return job

    def claim(self, worker_id, now=None, lease=LEASE_SECONDS, queues=None):
        self._claim_again = False
        job = Store.claim(self, worker_id, now, lease, queues)
        if job is None and self._claim_again:
            job = Store.claim(self, worker_id, now, lease, queues)
        return job

    def oldest_due(self, now):
        row = self._one("""
            SELECT MIN(run_at) FROM jobs
            WHERE ready = 0 AND blocked = 0 AND state IN ('pending', 'failed') AND run_at <= ?
              AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)""", (now,))
        firsts = [] if row[0] is None else [row[0]]
        for (queue,) in self._all("SELECT name FROM queues WHERE paused = 0"):
            first = self._one("""
                SELECT MIN(run_at) FROM jobs WHERE ready = 1 AND queue = ?""", (queue,))[0]
            if first is not None:
                firsts.append(first)
        return min(firsts) if firsts else None


for _name in ("submit", "claim", "finish", "heartbeat", "reclaim", "cancel", "retry_dead", "retry_failed",
              "purge", "set_queue", "set_config", "request_stop", "forget_workers", "register_worker",
              "unregister_worker", "append_output", "fold_counts"):
    setattr(PostgresStore, _name, _retried(getattr(PostgresStore, _name)))
del _name


def _md5_hex(text):
    import hashlib
    return hashlib.md5(text.encode("utf-8")).hexdigest()


###############################################################################
# Job input validation ##########################################################
###############################################################################

JOB_FIELDS = ("id", "command", "max_retries", "priority", "run_at", "delay", "timeout", "queue", "after",
              "unique", "env")
#: Earlier designs' names of job fields, accepted as they were (README: Aliases).
JOB_FIELD_ALIASES = {"next_run_at": "run_at"}


def _job_aliases(obj):
    """The job object with aliased fields under their own names."""
    if not isinstance(obj, dict) or not any(a in obj for a in JOB_FIELD_ALIASES):
        return obj
    obj = dict(obj)
    for alias, name in JOB_FIELD_ALIASES.items():
        if alias in obj:
            if name in obj:
                raise ValueError("give either %r or %r, not both" % (name, alias))
            obj[name] = obj.pop(alias)
    return obj
_INT64 = 2 ** 63


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("field %r must be an integer, not %s" % (name, _json_type(value)))
    if not low <= value <= high:
        raise ValueError("field %r must be between %d and %d, not %d" % (name, low, high, value))
    return value


def validate_job(obj, cwd, now):
    """Check one job object from the user; return the dict Store.enqueue takes.

    Raises ValueError with a message naming the field.
    """
    if not isinstance(obj, dict):
        raise ValueError("a job must be a JSON object, not %s" % _json_type(obj))
    obj = _job_aliases(obj)
    unknown = [k for k in obj if k not in JOB_FIELDS]
    if unknown:
        import difflib
        hint = difflib.get_close_matches(unknown[0], JOB_FIELDS, 1)
        raise ValueError("unknown field %r%s (valid: %s)" % (
            unknown[0], " (did you mean %r?)" % hint[0] if hint else "", ", ".join(JOB_FIELDS)))
    job = {"cwd": cwd}
    command = obj.get("command")
    if command is None:
        raise ValueError("field 'command' is required")
    if not isinstance(command, str):
        raise ValueError("field 'command' must be a string, not %s" % _json_type(command))
    if not command.strip():
        raise ValueError("field 'command' must not be empty")
    if "\0" in command:
        raise ValueError("field 'command' must not contain NUL bytes")
    try:
        size = len(command.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("field 'command' is not valid UTF-8 (it has undecodable bytes or a lone surrogate)")
    if size > MAX_COMMAND_BYTES:
        raise ValueError("field 'command' is too long (%d bytes; /bin/sh -c takes at most %d): "
                         "put it in a script and enqueue the script" % (size, MAX_COMMAND_BYTES))
    job["command"] = command
    if "id" in obj and obj["id"] is not None:
        if not valid_job_id(obj["id"]):
            raise ValueError("field 'id' must be 1-128 characters of letters, digits and ._:@+- "
                             "(not starting with - or .), not %s" % (
                                 repr(obj["id"])[:60] if isinstance(obj["id"], str) else _json_type(obj["id"])))
        job["id"] = obj["id"]
    if obj.get("max_retries") is not None:
        job["max_retries"] = _check_int("max_retries", obj["max_retries"], 0, 1000000)
    if obj.get("priority") is not None:
        job["priority"] = _check_int("priority", obj["priority"], -_INT64, _INT64 - 1)
    if obj.get("run_at") is not None and obj.get("delay") is not None:
        raise ValueError("give either 'run_at' or 'delay', not both")
    if obj.get("run_at") is not None:
        try:
            job["run_at"] = parse_time(obj["run_at"])
        except ValueError as e:
            raise ValueError("field 'run_at': %s" % e)
    if obj.get("delay") is not None:
        try:
            job["delay"] = parse_duration(obj["delay"])
        except ValueError as e:
            raise ValueError("field 'delay': %s" % e)
        job["run_at"] = now + job["delay"]      # Store.submit counts it again from its own now
    if "timeout" in obj:
        if obj["timeout"] is None:
            job["timeout"] = None
        else:
            try:
                timeout = parse_duration(obj["timeout"])
            except ValueError as e:
                raise ValueError("field 'timeout': %s" % e)
            if timeout <= 0:
                raise ValueError("field 'timeout' must be positive (use null for no timeout)")
            job["timeout"] = timeout
    if obj.get("queue") is not None:
        if not valid_queue_name(obj["queue"]):
            raise ValueError("field 'queue' must be 1-64 letters, digits and ._- (not starting with - or .), "
                             "not %s" % _printable_value(obj["queue"]))
        job["queue"] = obj["queue"]
    if obj.get("after") is not None and obj["after"] != []:      # [] as null: no dependencies
        after = obj["after"]
        if isinstance(after, str):
            after = [a.strip() for a in after.split(",")]
        if not isinstance(after, list) or not after:
            raise ValueError("field 'after' must be a list of job ids, not %s" % _printable_value(after))
        for a in after:
            if not valid_job_id(a):
                raise ValueError("field 'after': %s is not a job id" % _printable_value(a))
        if job.get("id") in after:
            raise ValueError("field 'after': job %r cannot run after itself" % job["id"])
        job["after"] = list(dict.fromkeys(after))
    if obj.get("unique") is not None:
        try:
            job["unique"] = check_unique_key(obj["unique"])
        except ValueError as e:
            raise ValueError("field 'unique' %s" % e)
    if obj.get("env") is not None:
        env = obj["env"]
        if not isinstance(env, dict):
            raise ValueError("field 'env' must be an object of NAME: value strings, not %s" % _json_type(env))
        for name, value in env.items():
            try:
                check_env_name(name)
            except ValueError as e:
                raise ValueError("field 'env': %s" % e)
            if not isinstance(value, str) or "\0" in value or not _encodable(value):
                raise ValueError("field 'env': the value of %s must be UTF-8 text without NUL bytes, not %s"
                                 % (name, _printable_value(value)))
        job["env"] = dict(env)
    return job


def check_unique_key(key):
    """A unique key as given (JSON `unique`, --unique), or ValueError."""
    if not isinstance(key, str) or not key.strip() or "\0" in key or len(key) > 256 or not _encodable(key):
        raise ValueError("must be a non-empty string of at most 256 characters, not %s" % _printable_value(key))
    return key


def check_env_name(name):
    """A job's environment variable name (JSON `env`, -e), or ValueError: what
    a shell can use (letters, digits, _; not starting with a digit) and not
    one of the QUEUECTL_ variables that queuectl sets."""
    if not isinstance(name, str) or not name or name[0].isdigit() \
            or not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
        raise ValueError("%s is not a valid variable name (letters, digits and _, not starting with a digit)"
                         % _printable_value(name))
    if name.startswith("QUEUECTL_"):
        raise ValueError("%s is reserved (queuectl sets the QUEUECTL_ variables)" % name)
    return name


def _printable_value(value):
    """A user's value for an error message: quoted and short if a string, else its JSON type."""
    if isinstance(value, str):
        return printable(repr(value))[:60]
    return _json_type(value)


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("field %r appears twice" % key)
        obj[key] = value
    return obj


def parse_jobs_text(text):
    """Jobs from a JSON object, a JSON array or JSON Lines: a list of (where, obj)."""
    import json
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    stripped = text.strip()
    if not stripped:
        raise ValueError("no jobs in input")

    def decode(s, where):
        try:
            return decoder.decode(s)
        except ValueError as e:
            raise ValueError("%sinvalid JSON: %s" % (where, e))

    if stripped.startswith("["):
        items = decode(stripped, "")
        if not items:
            raise ValueError("no jobs in input (empty array)")
        return [("item %d: " % (i + 1), item) for i, item in enumerate(items)]
    try:
        return [("", decoder.decode(stripped))]
    except ValueError as e:
        if "Extra data" not in str(e):
            if "\n" not in stripped:
                raise ValueError("invalid JSON: %s" % e)
    out = []
    # Only \n ends a line: str.splitlines() would also split inside strings
    # holding U+2028, U+2029 or U+0085, which JSON allows unescaped.
    for n, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            out.append(("line %d: " % n, decode(line, "line %d: " % n)))
    return out


###############################################################################
# Runner ######################################################################
###############################################################################

class RunResult:
    """What one run of a command did."""

    __slots__ = ("exit_code", "outcome", "ok", "stdout", "stderr", "duration")

    def __init__(self, exit_code, outcome, stdout=b"", stderr=b"", duration=0.0):
        self.exit_code = exit_code
        self.outcome = outcome
        self.ok = exit_code == 0 and outcome == "exit 0"
        self.stdout = stdout
        self.stderr = stderr
        self.duration = duration


class _Capture:
    """Keeps the first and the last `limit // 2` bytes of a stream, in bounded memory."""

    def __init__(self, limit):
        import collections
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = collections.deque()     # the chunks read last: at most half + one chunk
        self.tail_size = 0
        self.total = 0

    def feed(self, data):
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail.append(data)
            self.tail_size += len(data)
            while self.tail_size - len(self.tail[0]) >= self.half:
                self.tail_size -= len(self.tail.popleft())

    def value(self):
        tail = b"".join(self.tail)
        if self.total <= 2 * self.half:
            return bytes(self.head) + tail     # nothing was dropped
        tail = tail[-self.half:]
        cut = self.total - len(self.head) - len(tail)
        return bytes(self.head) + b"\n[... queuectl: %d byte%s cut ...]\n" % (cut, b"" if cut == 1 else b"s") \
            + bytes(tail)

    @staticmethod
    def parts(value, limit=OUTPUT_LIMIT):
        """value() read back: [(position in the stream, bytes)], all of the
        stream or its head and its tail around the cut."""
        import re
        half = max(limit // 2, 1)
        m = re.match(br"\n\[\.\.\. queuectl: (\d+) bytes? cut \.\.\.\]\n", value[half:half + 64])
        if len(value) <= 2 * half or m is None:
            return [(0, value)]
        return [(0, value[:half]), (half + int(m.group(1)), value[half + m.end():])]


class LiveOutput:
    """Output read since the caller last took it, for `logs --follow`: at most
    `limit` bytes (older chunks are dropped first), so memory stays bounded
    however fast a command prints."""

    def __init__(self, limit=LIVE_BUFFER_LIMIT):
        self.limit = limit
        self.chunks = []
        self.size = 0

    def add(self, stream, pos, data):
        self.chunks.append((stream, pos, data))
        self.size += len(data)
        while self.size > self.limit and len(self.chunks) > 1:
            self.size -= len(self.chunks.pop(0)[2])

    def take(self):
        chunks, self.chunks, self.size = self.chunks, [], 0
        return chunks


def _exited(proc):
    """Has the process exited? Where possible, without reaping it, so that its
    pid (the group id) cannot be reused before we have killed the group."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return proc.poll() is not None
    try:
        return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _os_bytes(text):
    """Text as bytes for the OS: in the locale's encoding (the bytes a user of
    that locale typed), or as UTF-8 where the locale cannot encode it (a
    check mark under ISO-8859-1), rather than fail in Popen."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return text.encode("utf-8")


def run_command(command, cwd=None, env=None, timeout=None, check=None,
                limit=OUTPUT_LIMIT, grace=KILL_GRACE_SECONDS, live=None, on_start=None):
    """Run `command` with /bin/sh -c in a new session (its own process group).

    Output is read while the command runs, so no pipe fills up, and only the
    head and tail of each stream are kept. On timeout the whole group gets
    SIGTERM, then SIGKILL after `grace` seconds. `check()` is called about
    ten times a second; if it returns a reason ('interrupted', 'cancelled',
    'lease lost') the group is killed the same way (at once for
    'interrupted'). When the shell exits, anything left in its group is killed.
    With `live` (a LiveOutput), every chunk read is also added to it as
    (stream, pos, data), stream 1 or 2, for check() to take away.
    `on_start(signal_group)` is called before the first check(), with a
    function that another thread may call while check() runs (the shell is
    not reaped meanwhile) to send the group a signal; after its SIGTERM, a
    reason from check() sends no second one, and SIGKILL follows `grace`
    seconds after the first. Never touches the database.
    """
    import selectors
    import signal
    import subprocess

    started = time.monotonic()
    try:
        proc = subprocess.Popen([b"/bin/sh", b"-c", _os_bytes(command)],
                                cwd=None if cwd is None else _os_bytes(cwd), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        where = " (cwd %s)" % cwd if cwd and not os.path.isdir(cwd) else ""
        return RunResult(None, "error: %s%s" % (e.strerror or e, where))
    out, err = _Capture(limit), _Capture(limit)
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    streams = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
    sel = selectors.DefaultSelector()
    for fd in captures:
        sel.register(fd, selectors.EVENT_READ)
    # A pidfd (Linux 5.3+, Python 3.9+) becomes readable when the shell exits,
    # so the loop sleeps in one select() whatever happens first.
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except OSError:
            pidfd = None
    open_pipes = len(captures)
    deadline = started + timeout if timeout else None
    reason = None        # why we are killing the group, if we are
    kill_at = None       # when SIGKILL follows the SIGTERM
    exited_at = None
    nap = 0.0002

    def kill(sig):
        # The shell is not reaped before the end, so its pid (the group id)
        # cannot have been reused.
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass

    termed = []     # when signal_group() sent SIGTERM

    def signal_group(sig):
        if sig == signal.SIGTERM:
            if termed:
                return
            termed.append(time.monotonic())
        kill(sig)

    if on_start is not None:
        on_start(signal_group)
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and pidfd is None and _exited(proc):
                exited_at = now
            if exited_at is not None and (not open_pipes or now - exited_at > EXIT_GRACE_SECONDS):
                break
            if reason is None and exited_at is None:
                if deadline is not None and now >= deadline:
                    reason = "timeout"
                elif check is not None:
                    reason = check()
                if reason == "interrupted":
                    kill(signal.SIGKILL)
                elif reason is not None:
                    if not termed:
                        kill(signal.SIGTERM)
                    kill_at = (termed[0] if termed else now) + grace
            elif kill_at is not None and now >= kill_at:
                kill(signal.SIGKILL)
                kill_at = None
            wait = 0.1
            if deadline is not None and reason is None:
                wait = max(0.0, min(wait, deadline - now))
            if exited_at is not None:
                wait = max(0.0, min(wait, exited_at + EXIT_GRACE_SECONDS - now))
            if not open_pipes and pidfd is None:
                # Output closed, process not yet exited: usually a matter of
                # microseconds, so nap briefly, then longer.
                time.sleep(min(wait, nap))
                nap = min(nap * 2, 0.05)
                continue
            for key, _ in sel.select(wait):
                if key.fd == pidfd:
                    exited_at = time.monotonic()
                    sel.unregister(pidfd)
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    if live is not None:
                        live.add(streams[key.fd], captures[key.fd].total, data)
                    captures[key.fd].feed(data)
                else:
                    sel.unregister(key.fd)
                    open_pipes -= 1
        # The shell has exited (not yet reaped): take down whatever it left.
        kill(signal.SIGKILL)
    except BaseException:
        kill(signal.SIGKILL)    # never leave a job running unsupervised
        raise
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        returncode = proc.wait()
    return _run_result(returncode, reason, out.value(), err.value(), time.monotonic() - started)


def _run_result(returncode, reason, out, err, duration):
    """The RunResult of a run: `reason` if we killed it, else what its exit status says."""
    import signal
    if reason is not None:
        return RunResult(None, reason, out, err, duration)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal %d" % -returncode
        return RunResult(128 - returncode, "killed by %s" % name, out, err, duration)
    outcome = "exit %d" % returncode
    if returncode == 127:
        outcome += " (command not found)"
    elif returncode == 126:
        outcome += " (not executable)"
    return RunResult(returncode, outcome, out, err, duration)


###############################################################################
# Worker ######################################################################
###############################################################################

def _log(message):
    """One line on stderr, written at once so lines of several workers don't mix."""
    line = "%s %s\n" % (time.strftime("%H:%M:%S"), printable(message))
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


class Worker:
    """Claims due jobs one at a time, runs them and records the result.

    How it stops is two flags, each only ever set (so that a signal handler
    running in the middle of another cannot undo it): `stopping` (claim no
    more, finish the current job and exit) and `stopping_hard` (kill the
    current job, put it back and exit; it comes with `stopping`). Who asked is
    three more, which decide whether the supervisor replaces this worker:
    `stop_by_supervisor` (SIGUSR1/SIGUSR2), `stop_by_sigterm` (SIGTERM or
    SIGHUP sent to this worker alone) and `stop_by_command` (`worker stop`,
    through the database).
    """

    def __init__(self, db_path, name="w1", once=False, log=_log, queues=None):
        self.db_path = db_path
        self.real_db_path = db_mark(db_path)    # what jobs get as $QUEUECTL_DB
        self.name = name
        self.once = once
        self.queues = queues        # the queues this worker serves (None: all)
        self.log = log
        self.pause_requested = False    # Ctrl-Z, relayed by the supervisor
        self.stopping = self.stopping_hard = False
        self.stop_by_supervisor = self.stop_by_sigterm = self.stop_by_command = False
        pid = os.getpid()
        start = process_start(pid)
        self.id = "%s:%d:%s" % (this_host(), pid, "-" if start is None else start)
        self.store = None
        self._base_env = None
        self._wal_retry_at, self._wal_step = 0, 0       # see _bound_wal()
        self._next_heartbeat = 0.0
        self._renewed_at = 0.0          # monotonic time of the last heartbeat that held the lease
        self._claimed_at = 0.0          # monotonic time just before the last claim began
        self._signal_job = None         # signals the running job's process group (see run_command)
        self._lease_gone = False        # the watchdog killed the running job
        self._watchdog = _Watchdog()
        self._next_retention = 0.0
        self._live = None               # output not yet stored for `logs --follow`
        self._live_written = False      # whether any of this run's was
        self._parent = os.getppid()
        self._signals = None            # the signal wake-up pipe (see _listen_for_signals)

    def install_signal_handlers(self):
        """Make this process's signals set the stop flags. The handlers only
        set flags: the loop acts on them where it holds no lock."""
        import signal
        # A handler, not SIG_IGN: an ignored signal stays ignored across exec, and
        # the jobs must get SIGINT's default action.
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGUSR1, self._on_supervisor_stop)
        signal.signal(signal.SIGUSR2, self._on_supervisor_stop_hard)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGHUP, self._on_sigterm)      # only ever sent to this worker alone
        signal.signal(signal.SIGTSTP, self._on_sigtstp)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)   # not the supervisor's relay

    def stop(self, hard=False):
        """Claim no more and exit after the current job; `hard`: kill it and put it back."""
        if hard:
            self.stopping_hard = True
        self.stopping = True

    def _on_supervisor_stop(self, signum, frame):
        """SIGUSR1: the supervisor's graceful stop."""
        self.stop_by_supervisor = True
        self.stop()

    def _on_supervisor_stop_hard(self, signum, frame):
        """SIGUSR2: the supervisor's hard stop."""
        self.stop_by_supervisor = True
        self.stop(hard=True)

    def _on_sigterm(self, signum, frame):
        """SIGTERM or SIGHUP to this worker alone: the first stops it
        gracefully, the next hard."""
        self.stop_by_sigterm = True
        self.stop(hard=self.stopping)

    def _on_sigtstp(self, signum, frame):
        """Ctrl-Z, relayed by the supervisor: see maybe_pause()."""
        self.pause_requested = True

    def _on_sigint(self, signum, frame):
        pass

    def _obey_worker_stop(self):
        """`worker stop` asked (seen in the database): a graceful stop."""
        self.log("%s stop requested" % self.name)
        self.stop_by_command = True
        self.stop()

    def run(self):
        """Work until asked to stop (or, with once, until nothing is due). Returns an exit code."""
        self.store = open_store(self.db_path, durable=False, listen=True)
        old_wakeup = self._listen_for_signals()
        try:
            self.store.register_worker(self.id)
            self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
            self._next_retention = time.monotonic() + RETENTION_EVERY_SECONDS
            self.reclaim_lost()
            self.apply_retention()
            pause = 1.0
            job = None
            while not self.stopping:
                try:
                    self._check_parent()
                    if self.stopping:
                        break
                    if job is None:
                        self._claimed_at = time.monotonic()     # the lease counts from before the claim
                        job = self.store.claim(self.id, queues=self.queues)
                        if job is not None and self.stopping:
                            continue    # a stop came during the claim: given back below
                    if job is not None:
                        # process() records the result and claims the next
                        # job in the same transaction.
                        current, job = job, None
                        job = self.process(current)
                    elif self._check_stop_command():
                        break
                    elif self.once:
                        break
                    else:
                        self.idle()
                    pause = 1.0
                except StoreError as e:
                    # A lock held too long, a full disk: wait and try again
                    # rather than die and be restarted in a loop.
                    self.log("%s database error (%s); retrying in %gs" % (self.name, e, pause))
                    end = time.monotonic() + pause
                    while not self.stopping and time.monotonic() < end:
                        time.sleep(0.05)
                    pause = min(pause * 2, 30.0)
            if job is not None:
                # Claimed with the last result, then told to stop before it
                # started: give it back, attempt and all.
                self.store.finish(job["id"], job["run"], self.id, RunResult(None, "interrupted"),
                                  interrupted=True)
                self.log("%s %s not started, back to pending" % (self.name, job["id"]))
            return EXIT_INTERRUPTED if self.stopping_hard else EXIT_OK
        finally:
            try:
                # Stopping for another reason, `worker stop` may have asked too:
                # then the supervisor must not replace this worker.
                if self.store.unregister_worker(self.id):
                    self.stop_by_command = True
            finally:
                self._watchdog.stop()
                self.store.close()
                self._stop_listening_for_signals(old_wakeup)

    def _listen_for_signals(self):
        """Make a signal end idle()'s wait at once: a handler only sets a flag,
        and select() would go on waiting after it ran (PEP 475). Python writes
        to the wake-up pipe for each signal it handles. Only the main thread
        may do this (a worker run in another thread, by tests, polls). Returns
        the wake-up fd it replaced."""
        import signal
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return None
        self._signals, self._signal_fds = r, (r, w)
        return old

    def _stop_listening_for_signals(self, old):
        if self._signals is not None:
            import signal
            signal.set_wakeup_fd(old)
            for fd in self._signal_fds:
                os.close(fd)
            self._signals = None

    def housekeeping(self, job_id=None):
        """Heartbeat (and every few beats, reclaim lost jobs) when due. Returns
        (cancel_requested, lease_held) for the current job."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return False, True
        self._next_heartbeat = now + HEARTBEAT_SECONDS
        try:
            with self._lease_watch(job_id):
                stop, cancel, held = self.store.heartbeat(self.id, job_id, stopping=self.stopping)
        except StoreError as e:
            # Measured after the failed beat, and counting a next beat that may
            # take as long (a hung connection takes seconds to fail): our lease
            # may run out before it returns, and another host take the job
            # back. End this run first, so that two never overlap.
            failed_at = time.monotonic()
            since = failed_at - self._renewed_at
            if job_id is not None and (self._lease_gone or since + (failed_at - now) >= LEASE_GIVE_UP_SECONDS):
                why = "the database did not answer; the watchdog broke the connection" if self._lease_gone else e
                self.log("%s %s lease not renewed for %.0fs (%s); stopping the job" % (
                    self.name, job_id, since, why))
                return False, False
            # The lease has LEASE_SECONDS to run; a missed beat is not a loss.
            self.log("%s heartbeat failed (%s); will retry" % (self.name, e))
            return False, True
        if job_id is not None and self._lease_gone:
            self.log("%s %s lease not renewed for %.0fs (the database answered too late); job stopped" % (
                self.name, job_id, time.monotonic() - self._renewed_at))
            return False, False
        if held:
            self._renewed_at = now
        if stop and not self.stopping:
            self._obey_worker_stop()
        self._check_parent()
        if job_id is None:
            self.reclaim_lost()
            if now >= self._next_retention:
                self._next_retention = now + RETENTION_EVERY_SECONDS
                self.apply_retention()
        return cancel, held

    @contextlib.contextmanager
    def _lease_watch(self, job_id):
        """Around a database call made while a job runs (a heartbeat, live
        output): should the call still be waiting LEASE_GIVE_UP_SECONDS after
        the lease was last renewed (a frozen proxy, a paused server, a disk
        that hangs), the watchdog kills the job, as a failed heartbeat would
        have, and breaks the connection so that the call fails. Armed only
        around these calls, every HEARTBEAT_SECONDS or so: a short job
        never arms it."""
        if job_id is None or self._signal_job is None:
            yield
            return
        self._watchdog.arm(self._renewed_at + LEASE_GIVE_UP_SECONDS, self._lease_expired)
        try:
            yield
        finally:
            self._watchdog.disarm()

    def _lease_expired(self):
        """The watchdog's action: SIGTERM to the job's process group (SIGKILL
        KILL_GRACE_SECONDS later, if the call still hangs: else the runner
        sends it) and break the connection. The main thread is inside the
        call, so the shell (the group's id) has not been reaped."""
        import signal
        sig = signal.SIGKILL if self._lease_gone else signal.SIGTERM
        self._lease_gone = True
        self._signal_job(sig)
        self.store.interrupt()
        return time.monotonic() + KILL_GRACE_SECONDS if sig == signal.SIGTERM else None

    def apply_retention(self):
        """Delete completed jobs older than the `retention` setting (never dead ones)."""
        retention = self.store.config()["retention"]
        if retention is not None:
            n = self.store.purge(["completed"], self.store.now() - retention)
            if n:
                self.log("%s retention: deleted %d completed job%s" % (self.name, n, "" if n == 1 else "s"))

    def _check_parent(self):
        """If our supervisor was killed, finish the job at hand, then go too."""
        if not self.stopping and os.getppid() != self._parent:
            self.log("%s supervisor gone; stopping" % self.name)
            self.stop()

    def _check_stop_command(self):
        """Has `worker stop` asked (or anything else)? Reads the database."""
        if not self.stopping and self.store.stop_requested(self.id):
            self._obey_worker_stop()
        return self.stopping

    def idle(self):
        """Wait until a job is due or we are asked to stop, reading nothing
        while we wait: a commit that makes work claimable (or asks a stop)
        nudges us through the store's waker (a FIFO beside the database); a
        signal ends the wait through the wake-up pipe. We wake by ourselves
        when the next waiting job falls due (a retry's backoff, --delay), and
        re-run the due check with every heartbeat anyway, for a nudge that was
        lost (IDLE_RECHECK_SECONDS)."""
        import select
        waker = self.store.waker()
        try:
            if waker.fileno() is None:
                return self._poll_idle()
            # Open before we look: a commit after the look nudges us, one
            # before it is seen by it. Old nudges are stale after the look.
            waker.drain()
            every = IDLE_RECHECK_SECONDS if waker.nudges() else IDLE_CLAIM_SECONDS
            recheck = self._next_look(every)
            waits = [waker] if self._signals is None else [waker, self._signals]
            while recheck is not None and not self.stopping:
                timeout = min(recheck, self._next_heartbeat) - time.monotonic()
                ready = select.select(waits, [], [], max(timeout, 0.0))[0]
                nudged = waker in ready
                if nudged:
                    waker.drain(1)      # one byte: the others wake other workers
                if self._signals in ready:
                    _drain(self._signals)
                self.maybe_pause()
                beat = time.monotonic() >= self._next_heartbeat
                self.housekeeping()     # first: its reclaim may make a job claimable
                if nudged or beat or time.monotonic() >= recheck:
                    recheck = self._next_look(every)
        finally:
            waker.close()

    def _next_look(self, every):
        """None if we are asked to stop or a claim could take a job now (a
        read, no lock); else the monotonic time of our next look: when the
        next waiting job falls due, `every` seconds from now at the latest."""
        if self._check_stop_command():
            return None
        now = self.store.now()
        due = self.store.due_at(now, self.queues)
        if due is not None and due <= now:
            return None
        return time.monotonic() + (every if due is None else min(every, due - now))

    def _poll_idle(self):
        """idle() where the store cannot wake us: read the data_version counter
        every IDLE_POLL_SECONDS (it changes when another connection commits)
        and run the due check when it changed, or every IDLE_CLAIM_SECONDS."""
        version = self.store.data_version()
        # A job enqueued after our last claim but before the counter was read
        # changes nothing we would see: look once now.
        if self.store.has_due(self.store.now(), self.queues):
            return
        recheck = time.monotonic() + IDLE_CLAIM_SECONDS
        nap, longest = IDLE_POLL_SECONDS
        while not self.stopping:
            time.sleep(nap)
            self.maybe_pause()
            nap = min(nap * 1.25, longest)
            now = time.monotonic()
            current = self.store.data_version()
            changed, version = current != version, current    # read once: no commit slips between
            if changed or now >= recheck:
                recheck = self._next_look(IDLE_CLAIM_SECONDS)
                if recheck is None:
                    return
            self.housekeeping()

    def maybe_pause(self):
        """Ctrl-Z: stop this process here, where it holds no transaction
        (a SIGSTOP could land inside one and hold the write lock)."""
        if self.pause_requested:
            import signal
            self.pause_requested = False
            os.kill(os.getpid(), signal.SIGSTOP)

    def reclaim_lost(self):
        """Take back jobs whose worker is provably dead (at once) or whose lease
        has expired; kill what is left of their commands on this host; forget
        workers that are dead, lost (Store.judge_worker) once their leases have
        expired, or have not been heard of for a long time."""
        now = self.store.now()
        gone, lost = set(), set()
        for w in self.store.workers():
            if w["id"] == self.id:
                continue
            judged = self.store.judge_worker(w, now)
            if judged == "dead" or now - w["heartbeat_at"] > FORGET_WORKER_SECONDS:
                gone.add(w["id"])
            elif judged == "lost":
                lost.add(w["id"])
        # Called only between jobs, so a lease of our own is one whose result
        # we could not record: it is reclaimed like any other, once expired.
        for lease in self.store.leases():
            # An unregistered holder has exited, or was found dead by someone else.
            dead = lease["host"] is None or lease["worker_id"] in gone
            if not dead and (lease["lease_until"] or 0) > now:
                continue
            host = lease["host"] or lease["worker_id"].rsplit(":", 2)[0]
            kill = None
            if host == this_host():
                def kill(lease=lease):
                    kill_job_processes(lease["id"], lease["worker_id"], self.real_db_path)
            result = self.store.reclaim(lease["id"], lease["worker_id"], lease["run"], dead, now, before=kill)
            if result is not None:
                self.log("%s %s worker lost (%s)%s" % (
                    self.name, lease["id"], lease["worker_id"], self._next_step(result)))
        if gone or lost:
            self.store.forget_workers(gone, lost, now)

    def _check(self, job):
        """Called by the runner while the command runs: stop, cancel or carry on."""
        self.maybe_pause()
        self._flush_live(job)
        if self.stopping_hard:
            return "interrupted"
        cancel, held = self.housekeeping(job["id"])
        if not held or self._lease_gone:
            return "lease lost"
        if cancel:
            return "cancelled"
        return None

    def _job_started(self, signal_group):
        self._signal_job = signal_group

    def _flush_live(self, job):
        """Every LIVE_OUTPUT_SECONDS, store the output read since the last time
        for `logs --follow` (so a quiet job shorter than that writes none), and
        sooner once half of LIVE_BUFFER_LIMIT waits (a fast writer: else the
        buffer would drop output that a follower keeping up never sees), at
        most every LIVE_OUTPUT_SOONEST. At
        most LIVE_OUTPUT_LIMIT bytes a run stay stored: the oldest go first. A
        failed write drops its chunks (the final output is stored anyway)."""
        if self._live is None or not self._live.chunks:
            return
        now = time.monotonic()
        if now < self._live_at and (self._live.size < LIVE_BUFFER_LIMIT // 2 or now < self._live_soonest):
            return
        self._live_at, self._live_soonest = now + LIVE_OUTPUT_SECONDS, now + LIVE_OUTPUT_SOONEST
        chunks = self._live.take()
        size = sum(len(c[2]) for c in chunks)
        self._live_sizes.extend(len(c[2]) for c in chunks)
        drop = 0
        while self._live_stored + size - drop > LIVE_OUTPUT_LIMIT and self._live_sizes:
            drop += self._live_sizes.pop(0)
        try:
            with self._lease_watch(job["id"]):
                stored = self.store.append_output(job["id"], job["run"], self.id, chunks, drop)
            if stored:
                self._live_stored += size - drop
                self._live_written = True
        except StoreError as e:
            self.log("%s %s could not store live output (%s)" % (self.name, job["id"], e))

    def _environ(self, job):
        """The job's environment: ours, plus the names of this run, by which
        its processes can be found after a lost lease. As bytes, encoded once
        per worker (Popen would encode every variable of every job again).
        (Setting them in os.environ instead would save ~30 us a job, but glibc
        never frees a replaced variable: a worker would grow by ~80 bytes a job.)"""
        if self._base_env is None:
            self._base_env = dict(os.environb)
            self._base_env[b"QUEUECTL_DB"] = _os_bytes(self.real_db_path)
            self._base_env[b"QUEUECTL_WORKER_ID"] = _os_bytes(self.id)
        env = dict(self._base_env)
        if job.get("env"):
            # Never QUEUECTL_*: validate_job refuses them.
            env.update((_os_bytes(k), _os_bytes(v)) for k, v in _json_loads(job["env"]).items())
        env[b"QUEUECTL_JOB_ID"] = _os_bytes(job["id"])
        env[b"QUEUECTL_ATTEMPT"] = b"%d" % job["attempts"]
        return env

    def process(self, job):
        """Run a claimed job and record the result; returns the next job,
        claimed in the same transaction, or None."""
        self.log("%s %s claimed (attempt %d/%d): %s" % (
            self.name, job["id"], job["attempts"], job["max_retries"] + 1, job["command"]))

        # The claim took the lease no earlier than this (its time was read
        # before the claim waited for the database, so count from there too).
        self._renewed_at = self._claimed_at
        self._lease_gone = False
        self._live, self._live_sizes, self._live_stored = LiveOutput(), [], 0
        self._live_written = False
        self._live_at, self._live_soonest = time.monotonic() + LIVE_OUTPUT_SECONDS, 0.0
        result = run_command(job["command"], cwd=job["cwd"], env=self._environ(job),
                             timeout=job["timeout"], check=lambda: self._check(job),
                             live=self._live, on_start=self._job_started)
        self._live, self._signal_job = None, None
        interrupted = result.outcome == "interrupted"
        if result.exit_code is None and result.outcome in ("timeout", "cancelled", "interrupted", "lease lost"):
            # Killing the process group misses what left it (setsid, daemons);
            # their environment still names this run.
            kill_job_processes(job["id"], self.id, self.real_db_path)
        settled, next_job = self._record_result(job, result, interrupted)
        self._bound_wal()
        if settled is None:
            self.log("%s %s lease lost: another worker took the job back (%s)" % (
                self.name, job["id"], result.outcome))
        elif settled[0] == "completed":
            self.log("%s %s completed in %s" % (self.name, job["id"], format_seconds(result.duration)))
        elif interrupted:
            self.log("%s %s interrupted, back to pending" % (self.name, job["id"]))
        else:
            self.log("%s %s %s%s" % (self.name, job["id"], result.outcome, self._next_step(settled)))
        return next_job

    def _record_result(self, job, result, interrupted):
        """Record the result; if the database is unwritable for a while (disk
        full, a lock held too long), keep trying for about a lease, so that
        the run is not lost to a passing problem. After that the job will be
        reclaimed as 'worker lost' and run again. Returns (settled, next job)."""
        give_up = time.monotonic() + LEASE_SECONDS
        while True:
            if self.stopping_hard:
                # A hard stop still records the result (it gives the attempt
                # back), but waits for the database only a few more seconds.
                give_up = min(give_up, time.monotonic() + 5.0)
            self._check_parent()
            claim_next = not self.stopping
            try:
                self._claimed_at = time.monotonic()     # the next job's lease counts from here
                done = self.store.finish(job["id"], job["run"], self.id, result, interrupted=interrupted,
                                         claim_next=claim_next, queues=self.queues, live=self._live_written)
                return done if claim_next else (done, None)
            except StoreError as e:
                if time.monotonic() >= give_up:
                    raise
                self.log("%s %s could not record the result (%s); retrying" % (self.name, job["id"], e))
                time.sleep(1.0)

    def _bound_wal(self):
        """Keep the WAL near WAL_SIZE_LIMIT: past it, truncate it. Each try
        holds every writer up for up to 0.1 s, so after a try that readers
        foiled, the next waits until the WAL has grown by 0.5 MiB more, then
        1, 2, ... up to 64 MiB: a reader that stays for long (an open sqlite3
        shell, a backup) costs a few tries, not one per job."""
        size = self.store.wal_size()
        if size <= WAL_SIZE_LIMIT:
            self._wal_retry_at, self._wal_step = 0, 0
            return
        if size < self._wal_retry_at:
            return
        try:
            done = self.store.truncate_wal()
        except StoreError as e:
            self.log("%s could not checkpoint the WAL (%s); will retry" % (self.name, e))
            done = False
        if done:
            self._wal_retry_at, self._wal_step = 0, 0
        else:
            self._wal_step = min(max(self._wal_step * 2, WAL_SIZE_LIMIT // 8), 16 * WAL_SIZE_LIMIT)
            self._wal_retry_at = size + self._wal_step

    @staticmethod
    def _next_step(settled):
        state, run_at = settled
        if state == "failed":
            return ", retry at %s" % time.strftime("%H:%M:%S", time.localtime(run_at))
        return ", %s" % state if state != "dead" else ", dead (moved to DLQ)"


def _worker_main(db_path, name, once, queues=None):
    """Entry point of a worker process (module level, takes only plain values).

    A worker leaves the terminal's foreground process group for one of its
    own, so that Ctrl-C reaches the supervisor only, which turns it into
    SIGUSR1 (graceful) or SIGUSR2 (hard). In the group, a Ctrl-C could also
    hit a job in the instant between its fork and its setsid() and kill it:
    CPython's vfork path resets signal handlers to the default before
    setsid(). SIGINT is still ignored here, for a SIGINT sent to the worker. A SIGTERM
    sent straight to a worker counts like one more stop request, of this worker
    only: unless its supervisor or `worker stop` also asked, it exits with
    EXIT_WORKER_TERMINATED and the supervisor starts another in its place.
    """
    import signal
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    # Inherited from the supervisor: its wake-up pipe is not ours to write to.
    signal.set_wakeup_fd(-1)

    def log(message):
        # From a background group, a line to the terminal would stop us under
        # `stty tostop`, unless SIGTTOU is ignored: ignored only for the
        # write, so that jobs do not inherit it. (Not a terminal, as under
        # systemd or with a log file: no signal, so no dance for each line.)
        if not on_terminal:
            return _log(message)
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            _log(message)
        finally:
            signal.signal(signal.SIGTTOU, old)
    on_terminal = os.isatty(2)

    worker = Worker(db_path, name=name, once=once, log=log, queues=queues)
    worker.install_signal_handlers()
    try:
        code = worker.run()
    except QueueError as e:
        log("%s error: %s" % (name, e))
        code = EXIT_ERROR
    if code in (EXIT_OK, EXIT_INTERRUPTED) and worker.stop_by_sigterm and not worker.stop_by_supervisor \
            and not worker.stop_by_command:
        code = EXIT_WORKER_TERMINATED
    sys.stdout.flush()
    os._exit(code)


###############################################################################
# Supervisor ##################################################################
###############################################################################

class Supervisor:
    """Runs N worker processes in the foreground and restarts those that die.

    First SIGINT/SIGTERM: stop claiming, let running jobs finish, exit 0.
    Second: kill running jobs, put them back to pending, exit 130. With
    `once`, workers exit when nothing is due and the supervisor follows.
    """

    def __init__(self, db_path, count=1, once=False, log=_log, queues=None):
        self.db_path = db_path
        self.count = count
        self.once = once
        self.queues = queues
        self.log = log
        self.stopping = False       # workers told to finish their jobs and exit (SIGUSR1)
        self.stopping_hard = False  # and then to kill them and put them back (SIGUSR2)
        self.failed = False     # a --once worker failed
        self.workers = {}       # name -> Process
        self._ctx = None        # the multiprocessing context workers start from
        self._restarts = {}     # name -> quick deaths in a row
        self._due = {}          # name -> when to restart it
        self._signalled = []    # stop signals caught, not yet acted on
        self._old_handlers = None

    def _start(self, name):
        proc = self._ctx.Process(target=_worker_main, args=(self.db_path, name, self.once, self.queues),
                                 name=name)
        proc.daemon = False
        proc.start()
        proc.started_at = time.monotonic()
        self.workers[name] = proc

    def _signal_workers(self, sig):
        # No is_alive() (a waitpid): this also runs inside signal handlers. A
        # worker not yet joined is unreaped, so its pid is still ours.
        for proc in list(self.workers.values()):
            try:
                os.kill(proc.pid, sig)
            except OSError:
                pass

    def run(self):
        """Start the workers, then until all have exited: wait, act on the
        signals caught, restart the workers that are due, reap those that exited."""
        import multiprocessing

        # fork: a worker is the supervisor's child (parent-death checks, signals
        # and the pool's session rely on it), whatever the platform's default.
        self._ctx = multiprocessing.get_context("fork")
        self.install_signal_handlers()
        try:
            for i in range(self.count):
                self._start("w%d" % (i + 1))
            self.log("started %d worker%s on %s%s%s" % (
                self.count, "" if self.count == 1 else "s", db_display(self.db_path),
                "" if self.queues is None else ", queue%s %s" % ("" if len(self.queues) == 1 else "s",
                                                                 ",".join(self.queues)),
                " (once)" if self.once else ""))
            while self.workers or self._due:
                self._wait()
                self._act_on_signals()
                for name, when in list(self._due.items()):
                    if time.monotonic() >= when:
                        del self._due[name]
                        self._start(name)
                for name, proc in list(self.workers.items()):
                    if proc.is_alive():
                        continue
                    proc.join()
                    del self.workers[name]
                    self._after_exit(name, proc)
        finally:
            self.restore_signal_handlers()
        self.log("all workers stopped")
        if self.stopping_hard:
            return EXIT_INTERRUPTED
        return EXIT_ERROR if self.failed else EXIT_OK

    # Signals. The handlers only note a stop signal and wake the loop (through
    # the wake-up fd, so that it never sleeps through one); the loop acts on it.

    def install_signal_handlers(self):
        import signal
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        stops = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            stops.append(signal.SIGHUP)     # the terminal went away (unless under nohup)
        old = {s: signal.signal(s, self._on_stop_signal) for s in stops}
        old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._on_sigtstp)
        old[signal.SIGCONT] = signal.signal(signal.SIGCONT, self._on_sigcont)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = old

    def restore_signal_handlers(self):
        import signal
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_stop_signal(self, signum, frame):
        """SIGINT, SIGTERM, SIGHUP: noted for _act_on_signals()."""
        self._signalled.append(signum)

    def _on_sigtstp(self, signum, frame):
        # Ctrl-Z reaches us alone (workers have groups of their own):
        # workers pause themselves where they hold no lock (within 0.1 s),
        # then we stop. Their jobs run on, as they always did.
        import signal
        self._signal_workers(signal.SIGTSTP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def _on_sigcont(self, signum, frame):
        import signal
        self._signal_workers(signal.SIGCONT)

    def _wait(self):
        """Sleep until a worker exits, a signal comes or a restart is due. No
        timeout otherwise: a signal always writes to the wake-up pipe, and an
        exited worker's sentinel is ready, so nothing needs a poll (an idle
        pool costs no CPU here)."""
        import multiprocessing.connection
        timeout = None
        if self._due:
            timeout = max(0.0, min(self._due.values()) - time.monotonic())
        sentinels = [p.sentinel for p in self.workers.values()]
        multiprocessing.connection.wait(sentinels + [self._wake_r], timeout=timeout)
        try:
            os.read(self._wake_r, 512)
        except BlockingIOError:
            pass

    def _act_on_signals(self):
        """The first stop signal stops the workers gracefully, the next hard."""
        import signal
        while self._signalled:
            if self._signalled.pop() == signal.SIGHUP and self.stopping:
                continue    # a closing terminal may send two: never a hard stop
            if self.stopping:
                self.log("stopping now: killing running jobs and putting them back")
            else:
                self.log("stopping: waiting for running jobs to finish (signal again to kill them)")
            self._stop_workers(hard=self.stopping)

    def _stop_workers(self, hard):
        """Tell every worker to stop (SIGUSR1, or SIGUSR2 if `hard`) and restart none."""
        import signal
        if hard:
            self.stopping_hard = True
        self.stopping = True
        self._signal_workers(signal.SIGUSR2 if hard else signal.SIGUSR1)
        self._due.clear()

    # The restart policy.

    def _after_exit(self, name, proc):
        """A worker has exited: restart it (later if it keeps dying quickly),
        or not (a stop, --once), or stop the others (`worker stop`)."""
        code = proc.exitcode
        quick = time.monotonic() - proc.started_at < 1.0
        self._restarts[name] = self._restarts.get(name, 0) + 1 if quick else 0
        delay = min(2 ** self._restarts[name], 30) if quick else 0
        if code == EXIT_WORKER_TERMINATED and not self.stopping:
            if self.once:
                self.log("%s (pid %d) stopped by SIGTERM" % (name, proc.pid))
            else:
                self.log("%s (pid %d) stopped by SIGTERM; starting another%s" % (
                    name, proc.pid, " in %ds" % delay if delay else ""))
                self._due[name] = time.monotonic() + delay
            return
        if code in (EXIT_OK, EXIT_INTERRUPTED) or self.stopping:
            if code == EXIT_OK and not self.once and not self.stopping:
                # A worker leaves on its own only when `worker stop` asked.
                self._stop_workers(hard=False)
            return
        how = "signal %d" % -code if code < 0 else "exit code %d" % code
        if self.once and code > 0:
            # From cron: report and let the next run try again,
            # rather than pile up supervisors that retry forever.
            self.log("%s (pid %d) failed (%s); not restarted with --once" % (name, proc.pid, how))
            self.failed = True
            return
        self.log("%s (pid %d) died (%s); restarting%s" % (
            name, proc.pid, how, " in %ds" % delay if delay else ""))
        # Restarted by the loop, which keeps answering signals meanwhile.
        self._due[name] = time.monotonic() + delay


###############################################################################
# Output ######################################################################
###############################################################################

def job_to_json(job):
    """A job as the documented JSON object (times as ISO-8601 UTC)."""
    return {
        "id": job["id"],
        "command": job["command"],
        "state": job["state"],
        "attempts": job["attempts"],
        "max_retries": job["max_retries"],
        "priority": job["priority"],
        "run_at": format_time(job["run_at"]),
        "timeout": job["timeout"],
        "created_at": format_time(job["created_at"]),
        "updated_at": format_time(job["updated_at"]),
        "exit_code": job["exit_code"],
        "outcome": job["outcome"],
        "cwd": job["cwd"],
        "worker": job["worker_id"],
        "queue": job["queue"],
        "unique": job["unique_key"],
    }


def run_to_json(run):
    duration = None
    if run["finished_at"] is not None:
        duration = round(run["finished_at"] - run["started_at"], 6)
    return {
        "run": run["run"],
        "attempt": run["attempt"],
        "worker": run["worker_id"],
        "started_at": format_time(run["started_at"]),
        "finished_at": format_time(run["finished_at"]),
        "duration": duration,
        "exit_code": run["exit_code"],
        "outcome": run["outcome"] or "running",
        "stdout_bytes": run["stdout_bytes"] or 0,
        "stderr_bytes": run["stderr_bytes"] or 0,
    }


def worker_alive(store, worker, now):
    """Is this registered worker alive: not dead or lost, and it heartbeats?"""
    return store.judge_worker(worker, now) == "alive" and now - worker["heartbeat_at"] < LEASE_SECONDS


def worker_to_json(worker):
    """A worker as `status --json` prints it (worker["alive"] set by the caller)."""
    return {"id": worker["id"], "host": worker["host"], "pid": worker["pid"],
            "started_at": format_time(worker["started_at"]),
            "heartbeat_at": format_time(worker["heartbeat_at"]),
            "job": worker["job_id"], "alive": worker["alive"],
            "stopping": bool(worker["stop_requested"])}


def job_detail_to_json(store, job, runs):
    """What `show --json` prints (and the dashboard's /api/jobs/ID)."""
    data = job_to_json(job)
    data["after"] = [{"id": i, "state": st} for i, st in store.dependencies(job["id"])]
    data["waiting"] = waiting_reason(store, job)
    data["env"] = _json_loads(job["env"]) if job["env"] else {}
    data["runs"] = [run_to_json(r) for r in runs]
    return data


def status_to_json(counts, workers, queues):
    """What `status --json` prints (and the dashboard's /api/status)."""
    return {"counts": counts,
            "workers": [worker_to_json(w) for w in workers],
            "queues": [{"name": q["name"], "limit": q["max_running"], "paused": bool(q["paused"])}
                       for q in queues]}


def print_json(value):
    import json
    # \u escapes where stdout is not UTF-8 (an ISO-8859-1 locale): still the same JSON.
    utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "") == "utf8"
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=not utf8) + "\n")


def print_table(headers, rows):
    """Columns aligned to their widest cell; control characters escaped."""
    rows = [[printable(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    out = []
    for row in [list(headers)] + rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths))
        out.append(line.rstrip())
    sys.stdout.write("\n".join(out) + "\n")


def _attempts(job):
    return "%d/%d" % (job["attempts"], job["max_retries"] + 1)


def waiting_reason(store, job, now=None):
    """Why a pending or failed job is not running, in a few words; None if it
    is not waiting, or is ready and only needs a free worker."""
    if job["state"] not in DUE_STATES:
        return None
    now = store.now() if now is None else now
    reasons = []
    if job["blocked"]:
        waiting = [(i, st) for i, st in store.dependencies(job["id"]) if st not in ("completed", None)]
        reasons.append("waiting for %s" % ", ".join("%s (%s)" % d for d in waiting))
    if job["run_at"] > now:
        reasons.append("%s at %s" % ("retry" if job["state"] == "failed" else "scheduled",
                                     format_local(job["run_at"])))
    q = store.queue_state(job["queue"])
    if q is not None and q["paused"]:
        reasons.append("queue %s is paused" % job["queue"])
    elif q is not None and q["max_running"] is not None and q["running"] >= q["max_running"]:
        reasons.append("queue %s is at its limit (%d running)" % (job["queue"], q["running"]))
    return "; ".join(reasons) or None


###############################################################################
# Dashboard ###################################################################
###############################################################################

# `queuectl dashboard`: a web page, a JSON API and /metrics, served by
# http.server in threads; its modules are imported only when it runs. The
# security model (README "Dashboard"): loopback by default; a token, given in
# the URL once and then kept in an HttpOnly SameSite=Strict cookie (Bearer for
# /api and /metrics); actions are POST-only, from the page's own origin; a
# Host allow-list against DNS rebinding; a CSP that allows only our own script
# and style URLs; every value escaped. One watcher thread reads PRAGMA
# data_version and pushes change marks to open pages (server-sent events);
# pages are server-rendered and work without JavaScript.

#: Default port of `queuectl dashboard`.
DASHBOARD_PORT = 8080
#: Jobs per page in the dashboard's lists, and the most a ?limit= may ask for.
DASHBOARD_PAGE = (50, 500)
#: A search (or a DLQ group filter) looks at most this many jobs back per page.
DASHBOARD_SCAN = 100000
#: The DLQ page groups the newest this many dead jobs (cached until the DLQ changes).
DASHBOARD_DLQ_GROUP_SCAN = 10000
#: "Retry all matching" moves at most this many jobs per click.
DASHBOARD_RETRY_MAX = 100000
#: Largest POST body (bytes) and longest request target accepted.
DASHBOARD_MAX_BODY = 64 * 1024
DASHBOARD_MAX_URL = 8192
#: A request's socket timeout (seconds): a slow or stalled client is dropped.
DASHBOARD_SOCKET_TIMEOUT = 20.0
#: Connections served at once, and live-update streams among them.
DASHBOARD_MAX_CONNECTIONS = 64
DASHBOARD_MAX_STREAMS = 32
#: How often the watcher reads PRAGMA data_version (one cheap read).
DASHBOARD_WATCH_SECONDS = 0.25
#: Output shown per stream on a job's page (the raw download has all that is stored).
DASHBOARD_OUTPUT_SHOWN = 256 * 1024
#: Bucket bounds (seconds) of the queuectl_run_duration_seconds histogram.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: queuectl_runs_total's outcome label values.
RUN_OUTCOMES = ("completed", "failed", "timeout", "cancelled", "lost", "interrupted")
#: A run's finished_at is taken before its transaction waits for the lock, so
#: it may reach the database this much later than it says (the busy timeout).
_RUN_COMMIT_SLACK = BUSY_TIMEOUT_SECONDS + 30.0

_DASH_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
             "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_DASH_HEADERS = (
    ("Content-Security-Policy", _DASH_CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
_STATE_HELP = {
    "pending": "waiting to run", "processing": "running now", "completed": "finished with exit 0",
    "failed": "failed, waiting for a retry", "dead": "in the dead letter queue",
}
_DONE = {
    "cancelled": "%d job(s) cancelled (running ones are killed by their worker)",
    "retried": "%d job(s) moved back to pending",
    "purged": "%d job(s) purged",
    "stopping": "asked %d worker(s) to stop after their current job",
    "paused": "%d queue paused: its running jobs finish, no new ones start",
    "resumed": "%d queue resumed",
}


def run_outcome(outcome, result_state):
    """queuectl_runs_total's label for a finished run."""
    if result_state == "completed":
        return "completed"
    if outcome in ("cancelled", "timeout"):
        return outcome
    if outcome in ("worker lost", "lease lost"):
        return "lost"
    if result_state == "pending":
        return "interrupted"
    return "failed"


def _h(value):
    """Text as HTML (None as '-'); the only way values reach a page."""
    import html
    return html.escape("-" if value is None else str(value), quote=True)


def _q(value):
    """A value as one URL path segment or query value."""
    import urllib.parse
    return urllib.parse.quote(str(value), safe="")


def _url(path, **params):
    """path?query from the params that are not None, escaped for HTML."""
    import urllib.parse
    query = urllib.parse.urlencode([(k, v) for k, v in params.items() if v is not None])
    return _h(path + ("?" + query if query else ""))


_ANSI = None


def strip_ansi(text):
    """Terminal escape sequences removed; \\r as a line break; other control
    characters shown escaped (tabs and newlines kept)."""
    global _ANSI
    if _ANSI is None:
        import re
        _ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                           r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]")
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _ago(ts, now):
    """'12s ago' style age, with the exact local time as a tooltip (HTML)."""
    if ts is None:
        return "-"
    secs = now - ts
    future = secs < 0
    secs = abs(secs)
    if secs < 60:
        text = "%ds" % secs
    elif secs < 3600:
        text = "%dm" % (secs // 60)
    elif secs < 86400:
        text = "%dh%02dm" % (secs // 3600, secs % 3600 // 60)
    else:
        text = "%dd%02dh" % (secs // 86400, secs % 86400 // 3600)
    return '<time data-ts="%.3f" title="%s">%s</time>' % (
        ts, _h(format_local(ts)), ("in " + text) if future else (text + " ago"))


def _dur(secs):
    return "-" if secs is None else format_seconds(secs)


def _badge(state):
    return '<span class="badge s-%s">%s</span>' % (_h(state), _h(state))


def _short(text, n=160):
    text = printable(text)
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _group_label(outcome, exit_code):
    return "%s%s" % (outcome or "no outcome", "" if exit_code is None or (outcome or "").startswith(
        "exit %d" % exit_code) else " (exit %d)" % exit_code)


def _svg_bars(series, labels, caption):
    """Stacked bars (completed under failed) as an inline SVG; no style attributes."""
    width, height, top, bottom = 600.0, 120.0, 14.0, 16.0
    peak = max([c + f for c, f, _ in series] + [1])
    step = width / max(len(series), 1)
    out = ['<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s">' % (width, height, _h(caption)),
           '<line class="axis" x1="0" y1="%g" x2="%g" y2="%g"/>' % (height - bottom, width, height - bottom)]
    scale = (height - top - bottom) / peak
    for i, (completed, failed, tip) in enumerate(series):
        x = i * step + 0.5
        w = max(step - 1.0, 0.5)
        y = height - bottom
        out.append('<g><title>%s</title>' % _h(tip))
        for value, cls in ((completed, "ok"), (failed, "bad")):
            if value:
                h = value * scale
                y -= h
                out.append('<rect class="%s" x="%.1f" y="%.1f" width="%.1f" height="%.1f"/>' % (cls, x, y, w, h))
        out.append('<rect class="hit" x="%.1f" y="%g" width="%.1f" height="%g"/></g>' % (
            x, top, w, height - top - bottom))
    out.append('<text x="2" y="10">%s</text>' % _h("max %d" % peak))
    out.append('<text x="0" y="%g">%s</text>' % (height - 3, _h(labels[0])))
    out.append('<text x="%g" y="%g" text-anchor="end">%s</text>' % (width, height - 3, _h(labels[1])))
    out.append("</svg>")
    return "".join(out)


def _svg_lines(lines, labels, caption, fmt=str):
    """Line chart of [(css class, name, values with None gaps)] as an inline SVG."""
    width, height, top, bottom = 600.0, 120.0, 14.0, 16.0
    values = [v for _, _, vs in lines for v in vs if v is not None]
    peak = max(values + [0]) or 1
    n = max(len(vs) for _, _, vs in lines) if lines else 1
    step = width / max(n - 1, 1)
    out = ['<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s">' % (width, height, _h(caption)),
           '<line class="axis" x1="0" y1="%g" x2="%g" y2="%g"/>' % (height - bottom, width, height - bottom)]
    scale = (height - top - bottom) / peak
    for cls, name, vs in lines:
        points, runs = [], []
        for i, v in enumerate(vs):
            if v is None:
                if points:
                    runs.append(points)
                points = []
                continue
            points.append("%.1f,%.1f" % (i * step, height - bottom - v * scale))
        if points:
            runs.append(points)
        for pts in runs:
            if len(pts) == 1:
                x, y = pts[0].split(",")
                out.append('<circle class="%s" cx="%s" cy="%s" r="2"><title>%s</title></circle>' % (
                    cls, x, y, _h(name)))
            else:
                out.append('<polyline class="%s" points="%s"><title>%s</title></polyline>' % (
                    cls, " ".join(pts), _h(name)))
    out.append('<text x="2" y="10">%s</text>' % _h("max " + fmt(peak)))
    out.append('<text x="0" y="%g">%s</text>' % (height - 3, _h(labels[0])))
    out.append('<text x="%g" y="%g" text-anchor="end">%s</text>' % (width, height - 3, _h(labels[1])))
    out.append("</svg>")
    return "".join(out)


class _StorePool:
    """Stores (connections) shared by request threads, one request at a time
    each. Connections are in autocommit mode: a read ends with its statement,
    so no read transaction outlives a request (the WAL can always be reset)."""

    def __init__(self, path, size=8):
        import threading
        self.path = path
        self.size = size
        self.free = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def store(self):
        with self.lock:
            store = self.free.pop() if self.free else None
        if store is None:
            store = open_store(self.path, create=False)
        try:
            yield store
        finally:
            store.abandon()
            with self.lock:
                if len(self.free) < self.size:
                    self.free.append(store)
                    store = None
            if store is not None:
                store.close()

    def close(self):
        with self.lock:
            for store in self.free:
                store.close()
            self.free = []


class _RunCounters:
    """queuectl_runs_total and the duration histogram. They start from the runs
    stored when the dashboard starts and then count each run seen to finish,
    so purging jobs never makes them go down (a restart starts them again,
    which Prometheus's rate() treats as a counter reset)."""

    def __init__(self):
        import threading
        self.lock = threading.Lock()
        self.totals = {o: [0, 0.0, [0] * len(DURATION_BUCKETS)] for o in RUN_OUTCOMES}
        self.ready = threading.Event()
        self.seen = {}          # (job_id, run) -> finished_at, for runs that may show up again
        self.since = None       # the next read starts here
        self.cost = 0.0
        self.next_at = 0.0

    def _add(self, outcome, result_state, bucket, count, total):
        t = self.totals[run_outcome(outcome, result_state)]
        t[0] += count
        t[1] += total or 0.0
        for i in range(bucket, len(DURATION_BUCKETS)):     # cumulative, as Prometheus wants
            t[2][i] += count

    @staticmethod
    def bucket(duration):
        return next((i for i, b in enumerate(DURATION_BUCKETS) if (duration or 0.0) <= b), len(DURATION_BUCKETS))

    def start(self, store):
        """Totals from every run stored, and the runs near the end marked as seen
        (one read transaction, so that no run is counted twice or missed)."""
        with self.lock, store.snapshot():
            for row in store.run_totals(DURATION_BUCKETS):
                self._add(*row)
            self.since = (store.newest()[1] or time.time()) - _RUN_COMMIT_SLACK
            for job_id, run, finished_at, _, _, _ in self._read(store, self.since):
                self.seen[(job_id, run)] = finished_at
        self.ready.set()

    def _read(self, store, since):
        rows = []
        while True:
            page = store.runs_finished_after(since, 5000)
            rows.extend(page)
            if len(page) < 5000 or page[-1][2] == since:
                return rows
            since = page[-1][2]

    def update(self, store, force=False):
        """Count the runs that finished since the last update (at most as often
        as 20 times its own cost, unless forced)."""
        with self.lock:
            now = time.monotonic()
            if self.since is None or (not force and now < self.next_at):
                return
            for job_id, run, finished_at, duration, outcome, state in self._read(store, self.since):
                if (job_id, run) in self.seen:
                    continue
                self.seen[(job_id, run)] = finished_at
                self._add(outcome, state, self.bucket(duration), 1, duration)
            if self.seen:
                self.since = max(self.since, max(self.seen.values()) - _RUN_COMMIT_SLACK)
                self.seen = {k: v for k, v in self.seen.items() if v >= self.since}
            self.cost = time.monotonic() - now
            self.next_at = time.monotonic() + max(1.0, 20 * self.cost)

    def snapshot(self):
        with self.lock:
            return {o: (t[0], t[1], list(t[2])) for o, t in self.totals.items()}


class _Watcher:
    """The one thread that watches the database for the dashboard: it reads
    PRAGMA data_version every DASHBOARD_WATCH_SECONDS and, when it moved (or
    every 5 s, as heartbeats age), derives a mark per topic (jobs, runs,
    workers, depth). Open pages get the marks over SSE and re-fetch only the
    parts whose topic changed; no page ever polls the database itself."""

    def __init__(self, db_path, counters, on_runs):
        import threading
        self.db_path = db_path
        self.counters = counters
        self.on_runs = on_runs      # on_runs(store): recompute stats; False when it had to wait
        self.stats_dirty = True
        self.stats_version = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.version = 0
        self.marks = {}
        self.depth = []         # (time, pending, failed, processing), every 10 s, a day's worth
        self.error = None
        self.store = None
        self.last, self.next_full, self.next_sample, self.next_runs = None, 0.0, 0.0, 0.0
        self.thread = threading.Thread(target=self.run, name="queuectl-watcher", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def current(self):
        with self.cond:
            return self.version, dict(self.marks)

    def wait(self, version, timeout):
        """Block until the marks move past `version` (or timeout, or stop)."""
        with self.cond:
            self.cond.wait_for(lambda: self.version != version or self.stopped, timeout)
            return self.version, dict(self.marks), self.stopped

    def prime(self):
        """The first pass, before the dashboard serves: marks ready (the run
        counters and stats follow in the thread: they read every run)."""
        self.store = open_store(self.db_path, create=False)
        self.poll(stats=False)

    def poll(self, stats=True):
        """One look at the database: new marks (and waiters woken) if it changed;
        the stats recomputed when runs finished (unless `stats` is False)."""
        now = time.time()
        dv = self.store.data_version()
        if dv == self.last and now < self.next_full and now < self.next_sample and not self.stats_dirty:
            return
        self.last, self.next_full = dv, now + 5.0
        counts, max_seq, max_finished, max_dead, workers = self.store.change_marks()
        at = self.store.now()       # heartbeats are the server's times on PostgreSQL
        states = tuple((w["id"], w["job_id"], w["stop_requested"], worker_alive(self.store, w, at)) for w in workers)
        marks = {"jobs": "%x" % (hash((tuple(counts.values()), max_seq)) & 0xffffffffffff),
                 "runs": repr(max_finished),
                 "dlq": "%d.%s" % (counts["dead"], max_dead),
                 "workers": "%x" % (hash(states) & 0xffffffffffff),
                 "queues": "%x" % (hash(tuple((q["name"], q["max_running"], q["paused"], tuple(q["counts"].values()))
                                              for q in self.store.queues())) & 0xffffffffffff),
                 "depth": self.marks.get("depth", "0"),
                 "stats": self.marks.get("stats", "0")}
        if now >= self.next_sample:
            self.next_sample = now + 10.0
            self.depth.append((now, counts["pending"], counts["failed"], counts["processing"]))
            del self.depth[:-8640]
            marks["depth"] = "%d" % len(self.depth)
        if marks["runs"] != self.marks.get("runs") or now >= self.next_runs:
            self.next_runs = now + 60.0     # the windows slide even when nothing runs
            self.counters.update(self.store)
            self.stats_dirty = True
        if stats and self.stats_dirty and self.on_runs(self.store):
            # Recomputed (it may have had to wait for its throttle: then it is
            # tried again at the next poll): pages showing stats re-fetch.
            self.stats_dirty = False
            self.stats_version += 1
            marks["stats"] = "%d" % self.stats_version
        with self.cond:
            if marks != self.marks:
                self.marks = marks
                self.version += 1
                self.cond.notify_all()

    def run(self):
        try:
            while True:
                with self.cond:
                    if self.cond.wait_for(lambda: self.stopped, DASHBOARD_WATCH_SECONDS):
                        return
                try:
                    if self.store is None:
                        self.prime()
                    if not self.counters.ready.is_set():
                        self.counters.start(self.store)
                    self.poll()
                    self.error = None
                except QueueError as e:
                    if str(e) != self.error:
                        _err("dashboard: %s" % e)
                    self.error = str(e)
                    if self.store is not None:
                        self.store.close()
                    self.store = None
                    time.sleep(1.0)
        finally:
            if self.store is not None:
                self.store.close()


class Dashboard:
    """What the request handlers share: the store pool, the watcher, the token
    and the settings. Pages are methods named after their route."""

    def __init__(self, db_path, token, hosts, port, read_only=False):
        self.db_path = db_path
        self.token = token
        self.hosts = hosts
        self.port = port
        self.read_only = read_only
        self.cookie = "queuectl_%d" % port
        self.pool = _StorePool(db_path)
        self.counters = _RunCounters()
        self.watcher = _Watcher(db_path, counters=self.counters, on_runs=self.refresh_stats)
        self.stats_cache = (None, None, 0.0, 0.0)     # key, value, computed at, cost
        self.groups_cache = (None, None)                # dlq mark, dead_groups()
        import threading
        self.stats_lock = threading.Lock()
        self.streams = threading.BoundedSemaphore(DASHBOARD_MAX_STREAMS)

    # -- data ------------------------------------------------------------------

    def status_json(self, store, now):
        counts = store.counts()
        workers = store.workers()
        for w in workers:
            w["alive"] = worker_alive(store, w, now)
        return status_to_json(counts, workers, store.queues()), workers

    def stats(self, store):
        """`stats` for the last hour and day plus the chart series, as the
        watcher last computed them (computed here only before its first time)."""
        value = self.stats_cache[1]
        return value if value is not None else self.refresh_stats(store, force=True)

    def refresh_stats(self, store, force=False):
        """compute_stats over finished_runs, as the `stats` command does, and
        the chart series from the same rows; run by the watcher when runs
        finished, at most every 10 times its own cost (at least 1 s). Returns
        the new value, or None when it is too soon (the watcher tries again)."""
        with self.stats_lock:
            _, value, at, cost = self.stats_cache
            if not force and value is not None and time.monotonic() - at < max(1.0, 10 * cost):
                return None
            t0 = time.monotonic()
            now = store.now()
            rows = store.finished_runs(now - 86400)
            value = {"last_hour": compute_stats(rows, now, 3600), "last_day": compute_stats(rows, now, 86400),
                     "at": now}
            minutes = [[0, 0] for _ in range(60)]
            hours = [[0, 0] for _ in range(24)]
            durations = [[] for _ in range(24)]
            for finished_at, duration, state, _ in rows:
                age = now - finished_at
                failed = 1 if state in ("failed", "dead") else 0
                ok = 1 if state == "completed" else 0
                if 0 <= age < 3600:
                    m = minutes[59 - int(age // 60)]
                    m[0] += ok
                    m[1] += failed
                if 0 <= age < 86400:
                    i = 23 - int(age // 3600)
                    hours[i][0] += ok
                    hours[i][1] += failed
                    if duration is not None:
                        durations[i].append(duration)
            for d in durations:
                d.sort()
            value["minutes"] = minutes
            value["hours"] = hours
            value["p50"] = [_percentile(d, 0.5) for d in durations]
            value["p95"] = [_percentile(d, 0.95) for d in durations]
            self.stats_cache = (None, value, time.monotonic(), time.monotonic() - t0)
            return value

    def dead_groups(self, store, mark):
        """store.dead_groups(), cached until the DLQ changes (the watcher's dlq mark)."""
        key, groups = self.groups_cache
        if key != mark or mark is None:
            groups = store.dead_groups(DASHBOARD_DLQ_GROUP_SCAN)
            self.groups_cache = (mark, groups)
        return groups

    def latency(self, store, now):
        oldest = store.oldest_due(now)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def metrics(self):
        """Prometheus text exposition format."""
        if not self.counters.ready.wait(DASHBOARD_SOCKET_TIMEOUT):
            raise _Unavailable("the run counters are still being read from the database; try again")
        with self.pool.store() as store:
            now = store.now()
            self.counters.update(store, force=True)
            counts = store.counts()
            queues = store.queues()
            workers = store.workers()
            latency = self.latency(store, now)
        out = ["# HELP queuectl_jobs Jobs stored, by state.", "# TYPE queuectl_jobs gauge"]
        out += ['queuectl_jobs{state="%s"} %d' % (s, counts[s]) for s in STATES]
        # Queue names are letters, digits and ._- only: nothing to escape in a label value.
        out += ["# HELP queuectl_queue_jobs Jobs stored, by queue and state.", "# TYPE queuectl_queue_jobs gauge"]
        out += ['queuectl_queue_jobs{queue="%s",state="%s"} %d' % (x["name"], s, x["counts"][s])
                for x in queues for s in STATES]
        out += ["# HELP queuectl_queue_paused 1 if the queue is paused (no new jobs start).",
                "# TYPE queuectl_queue_paused gauge"]
        out += ['queuectl_queue_paused{queue="%s"} %d' % (x["name"], 1 if x["paused"] else 0) for x in queues]
        totals = self.counters.snapshot()
        out += ["# HELP queuectl_runs_total Finished runs by outcome (from the runs stored when the "
                "dashboard started, then every run it saw finish; purging never lowers it).",
                "# TYPE queuectl_runs_total counter"]
        out += ['queuectl_runs_total{outcome="%s"} %d' % (o, totals[o][0]) for o in RUN_OUTCOMES]
        out += ["# HELP queuectl_run_duration_seconds Duration of finished runs.",
                "# TYPE queuectl_run_duration_seconds histogram"]
        for i, bound in enumerate(DURATION_BUCKETS):
            out.append('queuectl_run_duration_seconds_bucket{le="%g"} %d' % (
                bound, sum(t[2][i] for t in totals.values())))
        count = sum(t[0] for t in totals.values())
        out.append('queuectl_run_duration_seconds_bucket{le="+Inf"} %d' % count)
        out.append("queuectl_run_duration_seconds_sum %.6f" % sum(t[1] for t in totals.values()))
        out.append("queuectl_run_duration_seconds_count %d" % count)
        out += ["# HELP queuectl_queue_latency_seconds Age of the longest-waiting due job (0 if none).",
                "# TYPE queuectl_queue_latency_seconds gauge",
                "queuectl_queue_latency_seconds %.3f" % latency]
        states = {"alive": 0, "stopping": 0, "lost": 0}
        for w in workers:
            alive = worker_alive(store, w, now)
            states["lost" if not alive else "stopping" if w["stop_requested"] else "alive"] += 1
        out += ["# HELP queuectl_workers Registered workers, by state.", "# TYPE queuectl_workers gauge"]
        out += ['queuectl_workers{state="%s"} %d' % (s, n) for s, n in states.items()]
        return "\n".join(out) + "\n"

    # -- page frame --------------------------------------------------------------

    def frame(self, title, nav, parts, marks, now, flash=""):
        """A whole page: header, flash message, then `parts` (HTML strings)."""
        links = "".join('<a href="%s"%s>%s</a>' % (href, ' class="here"' if name == nav else "", name)
                        for name, href in (("Overview", "/"), ("Jobs", "/jobs"), ("DLQ", "/dlq")))
        import json
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                "<title>%s \u00b7 queuectl</title>"
                "<link rel=\"icon\" href=\"/static/icon.svg\" type=\"image/svg+xml\">"
                "<link rel=\"stylesheet\" href=\"/static/app.css?v=%s\">"
                "<script src=\"/static/app.js?v=%s\" defer></script></head>"
                "<body data-marks=\"%s\" data-now=\"%.3f\">"
                "<header><a class=\"brand\" href=\"/\">queuectl</a><nav>%s</nav>"
                "<span class=\"db\" title=\"database\">%s</span>%s"
                "<span id=\"live\" class=\"live off\" title=\"live updates\">static</span></header>"
                "<main>%s%s</main></body></html>\n") % (
            _h(title), __version__, __version__, _h(json.dumps(marks)), now, links, _h(db_display(self.db_path)),
            '<span class="ro">read-only</span>' if self.read_only else "", flash, "".join(parts))

    @staticmethod
    def region(name, topics, html, tag="section", cls=""):
        return '<%s class="region %s" data-region="%s" data-topics="%s">%s</%s>' % (
            tag, cls, name, topics, html, tag)

    def action(self, path, label, back, cls="", **fields):
        """A one-button POST form ('' when read-only)."""
        if self.read_only:
            return ""
        hidden = "".join('<input type="hidden" name="%s" value="%s">' % (_h(k), _h(v))
                         for k, v in fields.items() if v is not None)
        return ('<form class="inline" method="post" action="%s">%s'
                '<input type="hidden" name="back" value="%s"><button class="%s">%s</button></form>') % (
            _h(path), hidden, _h(back), cls, _h(label))

    # -- pages (each returns (title, nav, [(region name, topics, fn) or html])) ---

    def page_overview(self, store, q, now, marks):
        def counts_html():
            counts = store.counts()
            latency = self.latency(store, now)
            tiles = "".join(
                '<a class="tile s-%s" href="/jobs?state=%s"><b>%d</b><span>%s</span><small>%s</small></a>' % (
                    s, s, counts[s], s, _STATE_HELP[s]) for s in STATES)
            return ('<div class="tiles">%s<div class="tile lat"><b>%s</b><span>queue latency</span>'
                    '<small>age of the oldest due job</small></div></div>') % (tiles, _h(_dur(latency)))

        def workers_html():
            _, workers = self.status_json(store, now)
            if not workers:
                return "<h2>Workers</h2><p class=\"empty\">No workers registered. Start some with " \
                       "<code>queuectl worker start</code>.</p>"
            rows = []
            for w in workers:
                state = "lost" if not w["alive"] else "stopping" if w["stop_requested"] else "alive"
                job = '<a href="/jobs/%s">%s</a>' % (_q(w["job_id"]), _h(w["job_id"])) if w["job_id"] else "idle"
                rows.append("<tr><td>%s</td><td>%s</td><td class=\"num\">%d</td><td>%s</td><td>%s</td>"
                            "<td>%s</td></tr>" % (_badge(state), _h(w["host"]), w["pid"], job,
                                                  _ago(w["heartbeat_at"], now), _ago(w["started_at"], now)))
            n = {s: sum(1 for w in workers if (not w["alive"] and s == "lost") or
                        (w["alive"] and bool(w["stop_requested"]) == (s == "stopping") and s != "lost"))
                 for s in ("alive", "stopping", "lost")}
            stop = "" if self.read_only else ' <a class="btn small" href="/confirm/worker-stop">Stop workers\u2026</a>'
            return ("<h2>Workers <small>%d alive, %d stopping, %d lost</small>%s</h2>"
                    "<table><thead><tr><th>State</th><th>Host</th><th class=\"num\">PID</th><th>Job</th>"
                    "<th>Heartbeat</th><th>Started</th></tr></thead><tbody>%s</tbody></table>") % (
                n["alive"], n["stopping"], n["lost"], stop, "".join(rows))

        def stats_html():
            st = self.stats(store)
            rows = [("completed", "completed", str), ("failed runs", "failed_runs", str), ("dead", "dead", str),
                    ("success rate", "success_rate",
                     lambda v: "-" if v is None else "%.1f%%" % (v * 100)),
                    ("duration p50", "duration_p50", _dur), ("duration p95", "duration_p95", _dur),
                    ("duration max", "duration_max", _dur),
                    ("throughput", "throughput_per_min", lambda v: "%g/min" % v)]
            table = "".join("<tr><th>%s</th><td class=\"num\">%s</td><td class=\"num\">%s</td></tr>" % (
                label, _h(fmt(st["last_hour"][k])), _h(fmt(st["last_day"][k]))) for label, k, fmt in rows)
            mins = [(c, f, "%s: %d completed, %d failed" % (
                time.strftime("%H:%M", time.localtime(st["at"] - (59 - i) * 60)), c, f))
                for i, (c, f) in enumerate(st["minutes"])]
            hours = [(c, f, "%s: %d completed, %d failed" % (
                time.strftime("%H:00", time.localtime(st["at"] - (23 - i) * 3600)), c, f))
                for i, (c, f) in enumerate(st["hours"])]
            depth = [d for d in self.watcher.depth if d[0] >= now - 3600]
            return ("<div class=\"cols\"><div><h2>Last hour and day</h2><table class=\"stats\"><thead><tr><th></th>"
                    "<th class=\"num\">last hour</th><th class=\"num\">last day</th></tr></thead><tbody>%s</tbody>"
                    "</table></div><div class=\"charts\">"
                    "<figure><figcaption>Runs per minute, last hour <span class=\"key ok\">completed</span>"
                    "<span class=\"key bad\">failed</span></figcaption>%s</figure>"
                    "<figure><figcaption>Runs per hour, last day</figcaption>%s</figure>"
                    "<figure><figcaption>Run duration per hour, last day <span class=\"key p50\">p50</span>"
                    "<span class=\"key p95\">p95</span></figcaption>%s</figure>"
                    "<figure><figcaption>Queue depth <small>every 10 s since %s</small> <span class=\"key pending\">pending</span>"
                    "<span class=\"key failed\">failed</span><span class=\"key processing\">processing</span>"
                    "</figcaption>%s</figure></div></div>") % (
                table, _svg_bars(mins, ("-60m", "now"), "runs per minute"),
                _svg_bars(hours, ("-24h", "now"), "runs per hour"),
                _svg_lines([("p95", "p95", st["p95"]), ("p50", "p50", st["p50"])], ("-24h", "now"),
                           "run duration", fmt=format_seconds),
                _h(format_local(depth[0][0])[11:16] if depth else "now"),
                _svg_lines([("pending", "pending", [d[1] for d in depth]),
                            ("failed", "failed", [d[2] for d in depth]),
                            ("processing", "processing", [d[3] for d in depth])],
                           ("dashboard start" if depth and depth[0][0] > now - 3590 else "-60m", "now"),
                           "queue depth", fmt=lambda v: "%d" % v))

        def queues_html():
            rows = []
            for queue in store.queues():
                c, name = queue["counts"], queue["name"]
                running = "%d / %d" % (c["processing"], queue["max_running"]) \
                    if queue["max_running"] is not None else "%d" % c["processing"]
                if self.read_only:
                    act = ""
                elif queue["paused"]:
                    act = self.action("/actions/queue-resume", "resume", "/", "small", queue=name)
                else:
                    act = self.action("/actions/queue-pause", "pause", "/", "small", queue=name)
                rows.append("<tr><td><a href=\"%s\">%s</a></td><td>%s</td>%s<td class=\"num\">%s</td>"
                            "%s<td>%s</td></tr>" % (
                                _url("/jobs", queue=name), _h(name),
                                _badge("paused") if queue["paused"] else _badge("active"),
                                "<td class=\"num\">%d</td>" % c["pending"], running,
                                "".join("<td class=\"num\">%d</td>" % c[s] for s in ("failed", "dead", "completed")),
                                act))
            return ("<h2>Queues</h2><table class=\"queues\"><thead><tr><th>Queue</th><th>State</th>"
                    "<th class=\"num\">Pending</th><th class=\"num\">Running / limit</th>"
                    "<th class=\"num\">Failed</th><th class=\"num\">Dead</th><th class=\"num\">Completed</th>"
                    "<th></th></tr></thead><tbody>%s</tbody></table>") % "".join(rows)

        def dead_html():
            jobs, _ = store.find_jobs("dead", limit=8)
            if not jobs:
                return ""
            rows = "".join("<tr><td><a class=\"id\" href=\"/jobs/%s\">%s</a></td><td>%s</td><td>%s</td>"
                           "<td class=\"cmd\" title=\"%s\"><code>%s</code></td></tr>" % (
                               _q(j["id"]), _h(j["id"]), _h(j["outcome"]), _ago(j["updated_at"], now),
                               _h(_short(j["command"], 2000)), _h(_short(j["command"]))) for j in jobs)
            return ("<h2>Newest in the DLQ <a class=\"small\" href=\"/dlq\">DLQ \u2192</a></h2><table class=\"jobs\">"
                    "<thead><tr><th>ID</th><th>Last outcome</th><th>Died</th><th>Command</th></tr></thead>"
                    "<tbody>%s</tbody></table>") % rows

        return "Overview", "Overview", [("counts", "jobs", counts_html), ("queues", "queues", queues_html),
                                        ("workers", "workers jobs", workers_html),
                                        ("stats", "stats depth", stats_html), ("dead", "dlq", dead_html)]

    def _limit(self, q):
        try:
            return max(1, min(int(q.get("limit", DASHBOARD_PAGE[0])), DASHBOARD_PAGE[1]))
        except ValueError:
            raise QueueError("invalid limit %r" % q.get("limit"))

    @staticmethod
    def _seq(q, name):
        if not q.get(name):
            return None
        try:
            return int(q[name])
        except ValueError:
            raise QueueError("invalid %s %r" % (name, q[name]))

    def page_jobs(self, store, q, now, marks):
        state = q.get("state") or None
        _check_state(state)
        queue = q.get("queue") or None
        if queue is not None and not valid_queue_name(queue):
            raise QueueError("invalid queue name %r" % queue)
        text = q.get("q") or None
        limit = self._limit(q)
        before = self._seq(q, "before")
        here = "/jobs" + ("?" + q["_query"] if q.get("_query") else "")

        def list_html():
            jobs, low = store.find_jobs(state, text, before=before, limit=limit, scan=DASHBOARD_SCAN, queue=queue)
            queues = store.queues()
            counts = {s: sum(x["counts"][s] for x in queues if queue in (None, x["name"])) for s in STATES}
            options = "".join('<option value="%s"%s>%s (%d)</option>' % (
                s, " selected" if s == state else "", s, counts[s]) for s in STATES)
            queue_options = "".join('<option value="%s"%s>%s%s</option>' % (
                _h(x["name"]), " selected" if x["name"] == queue else "", _h(x["name"]),
                " (paused)" if x["paused"] else "") for x in queues)
            form = ('<form class="filters" method="get" action="/jobs"><select name="state" aria-label="state">'
                    '<option value="">all states (%d)</option>%s</select>'
                    '<select name="queue" aria-label="queue"><option value="">all queues</option>%s</select>'
                    '<input type="search" name="q" value="%s" placeholder="id prefix or command text" '
                    'aria-label="search">'
                    '<select name="limit" aria-label="page size">%s</select><button>Filter</button></form>') % (
                sum(counts.values()), options, queue_options, _h(text or ""),
                "".join('<option value="%d"%s>%d a page</option>' % (n, " selected" if n == limit else "", n)
                        for n in sorted({50, 100, 200, DASHBOARD_PAGE[1], limit})))
            exact = ""
            if text and before is None and valid_job_id(text) and store.states([text]):
                exact = '<p class="note">Job <a href="/jobs/%s">%s</a> has exactly this id.</p>' % (
                    _q(text), _h(text))
            rows = []
            for j in jobs:
                when = j["run_at"] if j["state"] in DUE_STATES else j["updated_at"]
                act = ""
                if j["state"] in DUE_STATES + ("processing",) and not j["cancel_requested"]:
                    act = self.action("/actions/cancel", "cancel", here, "small", one=j["id"])
                elif j["state"] == "dead":
                    act = self.action("/actions/retry", "retry", here, "small", one=j["id"])
                rows.append("<tr><td><a class=\"id\" href=\"/jobs/%s\">%s</a></td><td>%s</td><td>%s</td>"
                            "<td class=\"num\">%s</td><td class=\"num\">%d</td><td>%s</td><td class=\"num\">%s</td>"
                            "<td class=\"cmd\" title=\"%s\"><code>%s</code></td><td>%s</td></tr>" % (
                                _q(j["id"]), _h(j["id"]), _badge(j["state"]), _h(j["queue"]), _attempts(j),
                                j["priority"], _ago(when, now), _h(j["exit_code"]), _h(_short(j["command"], 2000)),
                                _h(_short(j["command"])), act))
            table = ("<table class=\"jobs\"><thead><tr><th>ID</th><th>State</th><th>Queue</th>"
                     "<th class=\"num\">Attempts</th><th class=\"num\">Pri</th><th>Due / updated</th>"
                     "<th class=\"num\">Exit</th><th>Command</th><th></th></tr></thead><tbody>%s</tbody></table>") % (
                "".join(rows))
            if not rows:
                table = "<p class=\"empty\">No jobs%s.</p>" % (" match" if text or state or queue else "")
            pager = []
            keep = dict(state=state, queue=queue, q=text, limit=limit)
            if before is not None:
                pager.append('<a href="%s">\u2190 newest</a>' % _url("/jobs", **keep))
            if len(jobs) == limit:
                pager.append('<a href="%s">older \u2192</a>' % _url("/jobs", before=jobs[-1]["seq"], **keep))
            elif low is not None:
                pager.append('<span class="note">searched %d jobs back</span> <a href="%s">search older \u2192</a>' % (
                    DASHBOARD_SCAN, _url("/jobs", before=low, **keep)))
            return "%s%s%s<nav class=\"pager\">%s</nav>" % (form, exact, table, " ".join(pager))

        title = "Jobs" + "".join(" \u00b7 " + x for x in (queue, state) if x)
        return title, "Jobs", [("list", "jobs", list_html)]

    def page_job(self, store, q, now, marks, job_id):
        store.get(job_id)       # JobNotFound -> 404
        here = "/jobs/" + _q(job_id)
        pick = self._seq(q, "run")

        def job_html():
            job = store.get(job_id)
            runs = store.recent_runs(job_id, 100)
            data = job_detail_to_json(store, job, ())
            after = ", ".join('<a href="/jobs/%s">%s</a> (%s)' % (_q(d["id"]), _h(d["id"]), _h(d["state"] or "purged"))
                              for d in data["after"])
            fields = [("queue", _h(job["queue"])), ("waiting", _h(data["waiting"] or "-")),
                      ("after", after or "-"), ("unique", _h(job["unique_key"] or "-")),
                      ("env", "<br>".join("<code>%s</code>" % _h(printable("%s=%s" % kv))
                                          for kv in sorted(data["env"].items())) or "-"),
                      ("attempts", _h(_attempts(job))), ("priority", _h(job["priority"])),
                      ("run at", _ago(job["run_at"], now)),
                      ("timeout", _h("-" if job["timeout"] is None else format_seconds(job["timeout"]))),
                      ("created", _ago(job["created_at"], now)), ("updated", _ago(job["updated_at"], now)),
                      ("exit code", _h(job["exit_code"])), ("outcome", _h(job["outcome"])),
                      ("cwd", "<code>%s</code>" % _h(printable(job["cwd"]))),
                      ("worker", _h(data["worker"])),
                      ("lease until", _ago(job["lease_until"], now) if job["lease_until"] else "-"),
                      ("runs started", _h(job["run_count"])),
                      ("cancel", "requested" if job["cancel_requested"] else "-")]
            acts = ""
            if job["state"] in DUE_STATES + ("processing",) and not job["cancel_requested"]:
                acts = self.action("/actions/cancel", "Cancel job", here, "danger", one=job_id)
            elif job["state"] == "dead":
                acts = self.action("/actions/retry", "Retry job", here, "", one=job_id)
            dl = "".join("<dt>%s</dt><dd>%s</dd>" % (k, v) for k, v in fields)
            timeline = self.timeline(runs, now) if runs else "<p class=\"empty\">No runs yet.</p>"
            rows = []
            for r in runs:
                rj = run_to_json(r)
                rows.append("<tr%s><td class=\"num\"><a href=\"%s\">%d</a></td><td class=\"num\">%d</td>"
                            "<td>%s</td><td>%s</td><td class=\"num\">%s</td><td class=\"num\">%s</td><td>%s</td>"
                            "<td>%s</td><td class=\"num\">%s / %s</td></tr>" % (
                                ' class="sel"' if r["run"] == (pick or runs[-1]["run"]) else "",
                                _url(here, run=r["run"]) + "#output", r["run"], r["attempt"],
                                _h(format_local(r["started_at"])), _h(format_local(r["finished_at"])),
                                _h(_dur(rj["duration"])), _h(r["exit_code"]), _h(rj["outcome"]),
                                _h(r["result_state"]), rj["stdout_bytes"], rj["stderr_bytes"]))
            table = ("<table><thead><tr><th class=\"num\">Run</th><th class=\"num\">Attempt</th><th>Started</th>"
                     "<th>Finished</th><th class=\"num\">Duration</th><th class=\"num\">Exit</th><th>Outcome</th>"
                     "<th>Then</th><th class=\"num\">Out / err bytes</th></tr></thead><tbody>%s</tbody></table>"
                     % "".join(rows)) if rows else ""
            return ("<div class=\"head\"><h1>Job <code>%s</code> %s</h1>%s</div><pre class=\"command\">%s</pre>"
                    "<dl class=\"fields\">%s</dl><h2>Runs <small>%d shown</small></h2>%s%s") % (
                _h(job_id), _badge(job["state"]), acts, _h(strip_ansi(job["command"])), dl, len(runs),
                timeline, table)

        def output_html():
            found = store.run_output(job_id, pick)
            if found is None:
                return ""
            run, finished, out, err = found
            parts = ["<h2 id=\"output\">Output of run %d%s</h2>" % (run, "" if finished else " (running: stored "
                                                                      "when the run ends)")]
            for name, data in (("stdout", out), ("stderr", err)):
                text = strip_ansi(data[-DASHBOARD_OUTPUT_SHOWN:].decode("utf-8", "replace"))
                cut = len(data) > DASHBOARD_OUTPUT_SHOWN
                parts.append("<div class=\"out\"><h3>%s <small>%d bytes%s</small> <a href=\"%s\">raw</a></h3>"
                             "<pre class=\"output\">%s</pre></div>" % (
                                 name, len(data), ", last %d shown" % DASHBOARD_OUTPUT_SHOWN if cut else "",
                                 _h("%s/runs/%d/%s" % (here, run, name)),
                                 _h(text) if data else "<span class=\"empty\">(empty)</span>"))
            return "".join(parts)

        return "Job " + job_id, "Jobs", [("job", "jobs runs", job_html), ("output", "runs", output_html)]

    @staticmethod
    def timeline(runs, now):
        """The runs as bars on one time axis (SVG)."""
        start = runs[0]["started_at"]
        end = max([r["finished_at"] or now for r in runs] + [start + 0.001])
        width, row = 1200.0, 12.0
        height = row * len(runs) + 16
        scale = width / (end - start)
        out = ['<svg class="timeline" viewBox="0 0 %d %d" role="img" aria-label="runs">' % (width, height)]
        for i, r in enumerate(runs):
            x = (r["started_at"] - start) * scale
            w = max(((r["finished_at"] or now) - r["started_at"]) * scale, 2.0)
            cls = {"completed": "ok", None: "run"}.get(r["result_state"], "bad")
            out.append('<rect class="%s" x="%.1f" y="%.1f" width="%.1f" height="%g"><title>%s</title></rect>' % (
                cls, x, i * row + 2, w, row - 4, _h("run %d: %s, %s" % (
                    r["run"], r["outcome"] or "running", _dur((r["finished_at"] or now) - r["started_at"])))))
        out.append('<text x="0" y="%g">%s</text>' % (height - 3, _h(format_local(start))))
        out.append('<text x="%g" y="%g" text-anchor="end">%s</text>' % (
            width, height - 3, _h(format_local(end))))
        out.append("</svg>")
        return "".join(out)

    @staticmethod
    def _group(q):
        """The DLQ group filter (outcome, exit_code) from ?g=1&outcome=&exit=, or None."""
        if not q.get("g"):
            return None
        exit_code = q.get("exit") or None
        if exit_code is not None:
            try:
                exit_code = int(exit_code)
            except ValueError:
                raise QueueError("invalid exit code %r" % exit_code)
        return (q.get("outcome") or None, exit_code)

    def page_dlq(self, store, q, now, marks):
        group = self._group(q)
        limit = self._limit(q)
        before = self._seq(q, "before")
        gparams = {} if group is None else {"g": "1", "outcome": group[0], "exit": group[1]}
        here = "/dlq" + ("?" + q["_query"] if q.get("_query") else "")

        def groups_html():
            groups = self.dead_groups(store, marks.get("dlq"))
            total = store.counts()["dead"]
            rows = []
            for g in groups:
                params = {"g": "1", "outcome": g["outcome"], "exit": g["exit_code"]}
                sel = group == (g["outcome"], g["exit_code"])
                retry = "" if self.read_only else '<a class="btn small" href="%s">retry all\u2026</a>' % _url(
                    "/confirm/retry", **params)
                rows.append("<tr%s><td><a href=\"%s\">%s</a></td><td class=\"num\">%s</td><td class=\"num\">%d</td>"
                            "<td>%s</td><td>%s</td></tr>" % (
                                ' class="sel"' if sel else "", _url("/dlq", **params),
                                _h(g["outcome"] or "(none)"), _h(g["exit_code"]), g["jobs"],
                                _ago(g["last_at"], now), retry))
            note = ""
            if total > DASHBOARD_DLQ_GROUP_SCAN:
                note = "<p class=\"note\">Groups of the newest %d of %d dead jobs.</p>" % (
                    DASHBOARD_DLQ_GROUP_SCAN, total)
            bulk = ""
            if not self.read_only and total:
                bulk = ' <a class="btn small" href="/confirm/retry">Retry all %d\u2026</a> ' \
                       '<a class="btn small danger" href="/confirm/purge?state=dead">Purge DLQ\u2026</a>' % total
            if not rows:
                return "<h1>Dead letter queue</h1><p class=\"empty\">The DLQ is empty.</p>"
            return ("<div class=\"head\"><h1>Dead letter queue <small>%d jobs</small></h1>%s</div>"
                    "<table class=\"groups\"><thead><tr><th>Outcome</th><th class=\"num\">Exit</th>"
                    "<th class=\"num\">Jobs</th><th>Last died</th><th></th></tr></thead><tbody>%s</tbody></table>%s"
                    ) % (total, bulk, "".join(rows), note)

        def list_html():
            jobs, low = store.find_jobs("dead", outcome=group, before=before, limit=limit, scan=DASHBOARD_SCAN)
            rows = []
            for j in jobs:
                check = "" if self.read_only else \
                    '<td><input type="checkbox" name="sel" value="%s" aria-label="select %s"></td>' % (
                        _h(j["id"]), _h(j["id"]))
                retry = "" if self.read_only else \
                    '<td><button class="small" name="one" value="%s">retry</button></td>' % _h(j["id"])
                rows.append("<tr data-id=\"%s\">%s<td><a class=\"id\" href=\"/jobs/%s\">%s</a></td>"
                            "<td class=\"num\">%s</td><td>%s</td><td>%s</td><td class=\"cmd\" title=\"%s\">"
                            "<code>%s</code></td>%s</tr>" % (
                                _h(j["id"]), check, _q(j["id"]), _h(j["id"]), _attempts(j), _h(j["outcome"]),
                                _ago(j["updated_at"], now), _h(_short(j["command"], 2000)),
                                _h(_short(j["command"])), retry))
            if not rows:
                return "" if group is None else "<p class=\"empty\">No dead jobs in this group.</p>"
            title = "<h2>%s <a class=\"small\" href=\"/dlq\">show all</a></h2>" % _h(
                _group_label(*group)) if group else "<h2>Newest dead jobs</h2>"
            head = ("<tr>%s<th>ID</th><th class=\"num\">Attempts</th><th>Last outcome</th><th>Died</th>"
                    "<th>Command</th>%s</tr>") % (
                "" if self.read_only else '<th><input type="checkbox" class="all" aria-label="select all"></th>',
                "" if self.read_only else "<th></th>")
            table = "<table class=\"jobs\"><thead>%s</thead><tbody>%s</tbody></table>" % (head, "".join(rows))
            pager = ""
            if len(jobs) == limit:
                pager = '<a href="%s">older \u2192</a>' % _url("/dlq", limit=limit, before=jobs[-1]["seq"], **gparams)
            elif low is not None:
                pager = '<a href="%s">search older \u2192</a>' % _url("/dlq", limit=limit, before=low, **gparams)
            if before is not None:
                pager = '<a href="%s">\u2190 newest</a> ' % _url("/dlq", limit=limit, **gparams) + pager
            if self.read_only:
                return "%s%s<nav class=\"pager\">%s</nav>" % (title, table, pager)
            return ("<form method=\"post\" action=\"/actions/retry\">%s<input type=\"hidden\" name=\"back\" value=\"%s\">"
                    "%s<div class=\"bar\"><button class=\"sel-retry\">Retry selected</button></div></form>"
                    "<nav class=\"pager\">%s</nav>") % (title, _h(here), table, pager)

        return "DLQ", "DLQ", [("groups", "dlq", groups_html), ("list", "dlq", list_html)]

    def page_confirm(self, store, q, now, marks, what):
        if self.read_only:
            raise _Forbidden("the dashboard is read-only")
        back = "/dlq" if what != "worker-stop" else "/"
        if what == "retry":
            group = self._group(q)
            upto = store.newest()[0] or 0
            n = store.count_matching("dead", outcome=group, upto=upto, cap=DASHBOARD_RETRY_MAX)
            which = "every dead job" if group is None else "every dead job with outcome <b>%s</b>" % _h(
                _group_label(*group))
            more = n > DASHBOARD_RETRY_MAX
            fields = {"upto": upto}
            if group is not None:
                fields.update(g="1", outcome=group[0], exit=group[1])
            body = ("<h1>Retry dead jobs</h1><p>This moves %s back to pending (attempts reset, due now): "
                    "<b>%s job%s</b> now.%s</p>%s <a href=\"%s\">Cancel</a>") % (
                which, "more than %d" % DASHBOARD_RETRY_MAX if more else n, "" if n == 1 else "s",
                " One click retries %d; click again for the rest." % DASHBOARD_RETRY_MAX if more else "",
                self.action("/actions/retry-matching", "Retry %s job%s" % (
                    DASHBOARD_RETRY_MAX if more else n, "" if n == 1 else "s"), "/dlq", "primary", **fields)
                if n else "", _h(back))
            return "Retry dead jobs", "DLQ", [body]
        if what == "purge":
            counts = store.counts()
            states = [s for s in ("completed", "dead") if s in (q.get("state") or "completed").split(",")]
            boxes = "".join('<label><input type="checkbox" name="state" value="%s"%s> %s (%d jobs)</label>' % (
                s, " checked" if s in states else "", s, counts[s]) for s in ("completed", "dead"))
            body = ("<h1>Purge jobs</h1><p>Deletes finished jobs and their logs for good (as <code>queuectl purge"
                    "</code>). The DLQ is purged only when ticked.</p><form method=\"post\" action=\"/actions/purge\">"
                    "<fieldset>%s</fieldset><label>Only those finished at least <input name=\"older_than\" "
                    "value=\"0\" size=\"6\" aria-label=\"older than\"> ago (e.g. 7d, 12h; 0 = all)</label>"
                    "<input type=\"hidden\" name=\"back\" value=\"%s\"><p><button class=\"danger\">Purge</button> "
                    "<a href=\"%s\">Cancel</a></p></form>") % (boxes, _h(back), _h(back))
            return "Purge", "DLQ", [body]
        if what == "worker-stop":
            _, workers = self.status_json(store, now)
            body = ("<h1>Stop workers</h1><p>Asks all %d registered worker%s to finish the job in hand and exit "
                    "(as <code>queuectl worker stop</code>). Running jobs are not killed.</p><p>%s "
                    "<a href=\"/\">Cancel</a></p>") % (
                len(workers), "" if len(workers) == 1 else "s",
                self.action("/actions/worker-stop", "Stop workers", "/", "danger"))
            return "Stop workers", "Overview", [body]
        raise JobNotFound(what)

    # -- actions (POST) ----------------------------------------------------------

    def act(self, name, form):
        """Run an action; returns (done code, count). Through the CLI's Store methods."""
        with self.pool.store() as store:
            if name == "cancel":
                ids = form.get("one", [])[:1] or form.get("sel", [])
                if not ids:
                    raise QueueError("no job selected")
                return "cancelled", len(store.cancel(list(dict.fromkeys(ids))))
            if name == "retry":
                ids = form.get("one", [])[:1] or form.get("sel", [])
                if not ids:
                    raise QueueError("no job selected")
                return "retried", len(store.retry_dead(list(dict.fromkeys(ids))))
            if name == "retry-matching":
                q = {k: v[0] for k, v in form.items()}
                group = self._group(q)
                upto = self._seq(q, "upto")
                if upto is None:
                    raise QueueError("missing upto")
                done, tries, refused = 0, 0, None
                while done < DASHBOARD_RETRY_MAX and tries < 20:
                    jobs, _ = store.find_jobs("dead", outcome=group, upto=upto,
                                              limit=min(PURGE_BATCH, DASHBOARD_RETRY_MAX - done))
                    if not jobs:
                        break
                    try:
                        done += len(store.retry_dead([j["id"] for j in jobs]))
                    except QueueError as e:
                        # One changed meanwhile (retried elsewhere): read the batch
                        # again. The same refusal twice (a job whose dependency is
                        # still dead) is the user's to see, as for one job.
                        if str(e) == refused:
                            raise
                        refused, tries = str(e), tries + 1
                return "retried", done
            if name == "purge":
                states = sorted(set(form.get("state", [])))
                if not states or not set(states) <= {"completed", "dead"}:
                    raise QueueError("choose completed and/or dead")
                try:
                    older = parse_duration((form.get("older_than") or ["0"])[0] or "0")
                except ValueError as e:
                    raise QueueError(str(e))
                return "purged", store.purge(states, store.now() - older)
            if name in ("queue-pause", "queue-resume"):
                queue = (form.get("queue") or [""])[0]
                if queue not in {row["name"] for row in store.queues()}:
                    raise QueueError("no queue %r" % queue)
                store.set_queue(queue, paused=1 if name == "queue-pause" else 0)
                return ("paused" if name == "queue-pause" else "resumed"), 1
            if name == "worker-stop":
                return "stopping", len(store.request_stop()[0])
        raise JobNotFound(name)


class _Forbidden(QueueError):
    pass


class _Unauthorized(QueueError):
    pass


class _Unavailable(QueueError):
    pass


def _dashboard_handler(app):
    """The request handler class for `app` (http.server imported here only)."""
    import hmac
    import http.server
    import json
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "queuectl/" + __version__
        timeout = DASHBOARD_SOCKET_TIMEOUT

        def version_string(self):
            return self.server_version

        def log_message(self, format, *args):
            pass        # URLs may carry the token; actions are logged by _handle

        def send_error(self, code, message=None, explain=None):
            self._send(code, ("%s\n" % (message or self.responses.get(code, ("error",))[0])).encode(),
                       "text/plain; charset=utf-8", close=True)

        def _send(self, code, body, ctype="text/html; charset=utf-8", headers=(), close=False):
            self.send_response(code)
            for name, value in _DASH_HEADERS:
                self.send_header(name, value)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _page(self, code, title, text):
            # No stylesheet: these pages are also what a visitor without the token gets.
            body = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>%s</title>"
                    "</head><body><main class=\"msg\"><h1>%s</h1>"
                    "<p>%s</p><p><a href=\"/\">Overview</a></p></main></body></html>\n") % (
                _h(title), _h(title), _h(text))
            self._send(code, body.encode())

        def _error(self, code, text):
            if self.path.startswith(("/api/", "/metrics", "/events")) or self.command == "POST" and \
                    "text/html" not in (self.headers.get("Accept") or ""):
                extra = (("WWW-Authenticate", 'Bearer realm="queuectl"'),) if code == 401 else ()
                self._send(code, (json.dumps({"error": text}) + "\n").encode(), "application/json", extra)
            else:
                self._page(code, {401: "Token needed", 403: "Forbidden", 404: "Not found"}.get(code, "Error"), text)

        def do_GET(self):
            self._handle()

        def do_HEAD(self):
            self._handle()

        def do_POST(self):
            self._handle()

        def _method_not_allowed(self):
            self.send_error(405)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

        # -- checks ------------------------------------------------------------------

        def _token_ok(self, token):
            return token is not None and hmac.compare_digest(token.encode("utf-8", "replace"),
                                                             app.token.encode())

        def _cookie_token(self):
            for header in self.headers.get_all("Cookie") or ():
                for part in header.split(";"):
                    name, _, value = part.strip().partition("=")
                    if name == app.cookie:
                        return value
            return None

        def _bearer(self):
            auth = self.headers.get("Authorization") or ""
            if auth[:7].lower() == "bearer ":
                return auth[7:].strip()
            return None

        def _handle(self):
            try:
                self._route()
            except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError) as e:
                if not isinstance(e, (BrokenPipeError, ConnectionResetError)) and not _is_timeout(e):
                    raise
            except _Unauthorized as e:
                self._error(401, str(e))
            except _Forbidden as e:
                self._error(403, str(e))
            except JobNotFound as e:
                self._error(404, str(e))
            except _Unavailable as e:
                self._error(503, str(e))
            except QueueError as e:
                self._error(409 if self.command == "POST" else 400, str(e))

        def _route(self):
            if len(self.path) > DASHBOARD_MAX_URL:
                return self.send_error(414)
            hosts = self.headers.get_all("Host") or []
            if len(hosts) != 1 or hosts[0].lower() not in app.hosts:
                raise _Forbidden("unexpected Host header (the dashboard answers only to %s)"
                                 % ", ".join(sorted(app.hosts)))
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            query = urllib.parse.parse_qs(url.query, max_num_fields=50)
            if path == "/healthz":
                return self._healthz()
            cookie = self._cookie_token()
            if self.command in ("GET", "HEAD") and "token" in query:
                if not self._token_ok(query["token"][0]):
                    raise _Unauthorized("wrong token")
                rest = urllib.parse.urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs],
                                              doseq=False)
                return self._send(303, b"", headers=(
                    ("Location", path + ("?" + rest if rest else "")),
                    ("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict" % (app.cookie, app.token))))
            authed = self._token_ok(cookie) or (
                path.startswith(("/api/", "/metrics")) and self._token_ok(self._bearer()))
            if not authed:
                raise _Unauthorized("open the address that `queuectl dashboard` printed (it ends in ?token=...)")
            if self.command == "POST":
                return self._post(path)
            if path.startswith("/actions/"):
                return self._send(405, b"POST only\n", "text/plain; charset=utf-8", (("Allow", "POST"),))
            return self._get(path, query, url.query)

        def _healthz(self):
            try:
                with app.pool.store() as store:
                    store.counts()
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            except QueueError as e:
                self._send(503, ("%s\n" % e).encode(), "text/plain; charset=utf-8")

        # -- POST --------------------------------------------------------------------

        def _post(self, path):
            if app.read_only:
                raise _Forbidden("the dashboard is read-only")
            # Same origin only: Origin must be ours, and Sec-Fetch-Site (set by
            # browsers, never by pages) same-origin when sent. Our own pages'
            # forms arrive with "Origin: null": Referrer-Policy no-referrer
            # makes browsers send that; it is accepted only with Sec-Fetch-Site
            # same-origin.
            origin = self.headers.get("Origin")
            host = self.headers.get("Host").lower()
            site = self.headers.get("Sec-Fetch-Site")
            if site is not None and site != "same-origin":
                raise _Forbidden("cross-site request refused (Sec-Fetch-Site %s)" % site)
            if not (origin is not None and origin.lower() == "http://" + host or
                    origin == "null" and site == "same-origin"):
                raise _Forbidden("cross-origin request refused (Origin %s)" % (origin or "missing"))
            if self.headers.get("Transfer-Encoding"):
                return self.send_error(411)
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.send_error(411)
            if length < 0 or length > DASHBOARD_MAX_BODY:
                return self.send_error(413)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/x-www-form-urlencoded":
                return self.send_error(415)
            body = self.rfile.read(length).decode("utf-8", "replace")
            form = urllib.parse.parse_qs(body, max_num_fields=PURGE_BATCH * 2)
            if not path.startswith("/actions/"):
                raise JobNotFound(path)
            done, n = app.act(path[len("/actions/"):], form)
            _err("dashboard: %s" % (_DONE[done] % n))
            back = (form.get("back") or ["/"])[0]
            if not back.startswith("/") or back.startswith("//") or any(c in back for c in "\\\r\n"):
                back = "/"
            back = urllib.parse.urlsplit(back)
            keep = [(k, v) for k, v in urllib.parse.parse_qsl(back.query) if k not in ("done", "n")]
            location = back.path + "?" + urllib.parse.urlencode(keep + [("done", done), ("n", n)])
            if "application/json" in (self.headers.get("Accept") or ""):
                return self._send(200, (json.dumps({"done": done, "count": n}) + "\n").encode(), "application/json")
            self._send(303, b"", headers=(("Location", location),))

        # -- GET ---------------------------------------------------------------------

        def _get(self, path, query, raw_query):
            q = {k: v[0] for k, v in query.items()}
            q["_query"] = urllib.parse.urlencode([(k, v) for k, vs in query.items()
                                                  if k not in ("done", "n", "fragment") for v in vs])
            if path.startswith("/static/"):
                return self._static(path)
            if path == "/events":
                return self._events()
            if path == "/metrics":
                return self._send(200, app.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            if path.startswith("/api/"):
                return self._api(path, q)
            version, marks = app.watcher.current()      # before reading: a change after is never missed
            parts_of = path.strip("/").split("/")
            with app.pool.store() as store:
                now = store.now()       # the database's clock: its times are the server's on PostgreSQL
                if path == "/":
                    page = app.page_overview(store, q, now, marks)
                elif path == "/jobs":
                    page = app.page_jobs(store, q, now, marks)
                elif len(parts_of) == 2 and parts_of[0] == "jobs":
                    page = app.page_job(store, q, now, marks, urllib.parse.unquote(parts_of[1]))
                elif len(parts_of) == 5 and parts_of[0] == "jobs" and parts_of[2] == "runs":
                    return self._raw(store, urllib.parse.unquote(parts_of[1]), parts_of[3], parts_of[4])
                elif path == "/dlq":
                    page = app.page_dlq(store, q, now, marks)
                elif len(parts_of) == 2 and parts_of[0] == "confirm":
                    page = app.page_confirm(store, q, now, marks, parts_of[1])
                else:
                    raise JobNotFound(path)
                title, nav, parts = page
                want = q.get("fragment")
                html = []
                for part in parts:
                    if isinstance(part, tuple):
                        name, topics, fn = part
                        if want is not None and want != name:
                            continue
                        html.append(fn() if want is not None else app.region(name, topics, fn()))
                    elif want is None:
                        html.append(part)
            if want is not None:
                if not html:
                    raise JobNotFound("fragment " + want)
                return self._send(200, "".join(html).encode(), headers=(("X-Marks", json.dumps(marks)),))
            flash = ""
            if q.get("done") in _DONE:
                try:
                    flash = '<p class="flash">%s</p>' % _h(_DONE[q["done"]] % int(q.get("n", "0")))
                except ValueError:
                    pass
            self._send(200, app.frame(title, nav, html, marks, now, flash).encode())

        def _raw(self, store, job_id, run, stream):
            try:
                run = int(run)
            except ValueError:
                raise JobNotFound(job_id)
            if stream not in ("stdout", "stderr"):
                raise JobNotFound(stream)
            store.get(job_id)
            found = store.run_output(job_id, run)
            if found is None:
                raise QueueError("job %r has no run %d" % (job_id, run))
            data = found[2] if stream == "stdout" else found[3]
            name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in job_id)
            self._send(200, data, "text/plain", (
                ("Content-Disposition", 'attachment; filename="%s-run%d.%s.txt"' % (name, run, stream)),))

        def _json(self, value):
            self._send(200, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode(), "application/json")

        def _api(self, path, q):
            parts = path.strip("/").split("/")
            with app.pool.store() as store:
                now = store.now()
                if path == "/api/status":
                    return self._json(app.status_json(store, now)[0])
                if path == "/api/stats":
                    stats = app.stats(store)
                    return self._json({"last_hour": stats["last_hour"], "last_day": stats["last_day"],
                                       "counts": store.counts()})
                if path == "/api/jobs":
                    state, queue = q.get("state") or None, q.get("queue") or None
                    _check_state(state)
                    if queue is not None and not valid_queue_name(queue):
                        raise QueueError("invalid queue name %r" % queue)
                    jobs, low = store.find_jobs(state, q.get("q") or None, before=app._seq(q, "before"),
                                                limit=app._limit(q), scan=DASHBOARD_SCAN, queue=queue)
                    nxt = jobs[-1]["seq"] if len(jobs) == app._limit(q) else low
                    return self._json({"jobs": [job_to_json(j) for j in jobs], "next_before": nxt})
                if path == "/api/dlq":
                    return self._json({"groups": app.dead_groups(store, app.watcher.current()[1].get("dlq"))})
                if len(parts) == 3 and parts[1] == "jobs":
                    job_id = urllib.parse.unquote(parts[2])
                    job = store.get(job_id)
                    return self._json(job_detail_to_json(store, job, store.recent_runs(job_id, 1000)))
            raise JobNotFound(path)

        def _static(self, path):
            name = path[len("/static/"):]
            if name not in _DASH_STATIC:
                raise JobNotFound(path)
            ctype, text = _DASH_STATIC[name]
            self._send(200, text.encode(), ctype)

        def _events(self):
            """Server-sent events: the watcher's marks now and after each change."""
            if not app.streams.acquire(blocking=False):
                return self.send_error(503, "too many live pages open")
            try:
                self.send_response(200)
                for name, value in _DASH_HEADERS:
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                version, marks = app.watcher.current()
                self.wfile.write(("retry: 2000\ndata: %s\n\n" % json.dumps(marks)).encode())
                self.wfile.flush()
                while True:
                    new, marks, stopped = app.watcher.wait(version, 15.0)
                    if stopped:
                        return
                    if new == version:
                        self.wfile.write(b": keep-alive\n\n")
                    else:
                        version = new
                        self.wfile.write(("data: %s\n\n" % json.dumps(marks)).encode())
                    self.wfile.flush()
            finally:
                app.streams.release()

    return Handler


def _is_timeout(error):
    import socket
    return isinstance(error, socket.timeout)


def _dashboard_token(path):
    """A new random token, or the one kept in `path` (created 0600 if missing)."""
    import secrets
    if path is None:
        return secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        except OSError as e:
            raise QueueError("cannot create token file %s: %s" % (path, e.strerror or e))
        return token
    except OSError as e:
        raise QueueError("cannot read token file %s: %s" % (path, e.strerror or e))
    with os.fdopen(fd) as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise QueueError("token file %s is readable by other users; run: chmod 600 %s" % (path, path))
        try:
            token = f.read(1000).strip()
        except (OSError, UnicodeDecodeError):
            token = ""
    if len(token) < 16 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in token):
        raise QueueError("token file %s does not hold a token (16+ characters of A-Z a-z 0-9 - _); "
                         "delete it to make a new one" % path)
    return token


def _allowed_hosts(host, port, extra=()):
    """The Host header values the dashboard answers to (DNS rebinding defence)."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    names.add("[%s]" % host if ":" in host else host)
    if host in ("0.0.0.0", "::", ""):
        import socket
        names.update({this_host(), socket.getfqdn()})
    names.update(extra)
    allowed = {("%s:%d" % (n, port)).lower() for n in names}
    if port == 80:
        allowed.update(n.lower() for n in names)
    return allowed


def run_dashboard(db_path, host="127.0.0.1", port=DASHBOARD_PORT, read_only=False, token_file=None,
                  allow_hosts=()):
    """Serve the dashboard in the foreground until SIGINT or SIGTERM (then 0)."""
    import http.server
    import signal
    import socket
    import threading

    open_store(db_path).close()      # a bad path or a newer schema: one clear error, before listening
    token = _dashboard_token(token_file)
    loopback = host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        active = threading.BoundedSemaphore(DASHBOARD_MAX_CONNECTIONS)

        def process_request(self, request, client_address):
            if not self.active.acquire(blocking=False):
                self.shutdown_request(request)      # too many at once: drop, do not queue threads
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.active.release()

        def handle_error(self, request, client_address):
            import traceback
            _err("dashboard: internal error: %s" % traceback.format_exc().strip().splitlines()[-1])

    try:
        server = Server((host, port), None)
    except OSError as e:
        raise QueueError("cannot listen on %s port %d: %s" % (host, port, e.strerror or e))
    port = server.server_address[1]
    app = Dashboard(db_path, token, _allowed_hosts(host, port, allow_hosts), port, read_only=read_only)
    server.RequestHandlerClass = _dashboard_handler(app)
    shown = this_host() if host in ("0.0.0.0", "::", "") else ("[%s]" % host if ":" in host else host)
    # Signals are taken with sigwait() in this thread: blocked before any
    # thread starts (threads inherit the mask), so none of them sees one.
    stops = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    thread = threading.Thread(target=server.serve_forever, name="queuectl-dashboard", daemon=True)
    try:
        app.watcher.prime()
        app.watcher.start()
        thread.start()
        if not loopback:
            _err("warning: the dashboard listens on %s, not only on this machine: anyone who can reach "
                 "port %d and has the token can see and change the queue (plain HTTP: put TLS in front)"
                 % (host, port))
        sys.stdout.write("http://%s:%d/?token=%s\n" % (shown, port, token))
        sys.stdout.flush()
        _err("dashboard for %s on port %d%s; Ctrl-C stops it" % (db_display(db_path), port, " (read-only)" if read_only else ""))
        signal.sigwait(stops)
    finally:
        app.watcher.stop()
        server.shutdown()
        server.server_close()
        app.pool.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return EXIT_OK


_DASH_ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" \
fill="#1f2937"/><rect x="3" y="4" width="10" height="2" fill="#60a5fa"/><rect x="3" y="7" width="7" height="2" \
fill="#34d399"/><rect x="3" y="10" width="4" height="2" fill="#f87171"/></svg>
"""

_DASH_CSS = """
:root { --fg: #1f2933; --muted: #66727f; --line: #e3e7eb; --bg: #f6f7f9; --card: #fff; --link: #1d5fbf;
  --ok: #1f9d55; --bad: #d64545; --pending: #5b6b7f; --processing: #2f6fd6; --failed: #d98a16;
  --dead: #c53030; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
code, pre, .id { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12px; }
a { color: var(--link); text-decoration: none; } a:hover { text-decoration: underline; }
header { display: flex; align-items: center; gap: 18px; padding: 0 20px; height: 42px; background: #1f2933;
  color: #cbd2d9; }
header .brand { color: #fff; font-weight: 700; font-size: 15px; letter-spacing: .02em; }
header nav { display: flex; gap: 4px; }
header nav a { color: #cbd2d9; padding: 4px 10px; border-radius: 4px; }
header nav a.here, header nav a:hover { background: #323f4b; color: #fff; text-decoration: none; }
header .db { margin-left: auto; font-family: ui-monospace, monospace; font-size: 11px; color: #9aa5b1;
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; max-width: 40%; }
header .ro { background: #52606d; color: #fff; padding: 1px 7px; border-radius: 9px; font-size: 11px; }
.live { font-size: 11px; padding: 1px 8px; border-radius: 9px; background: #3e4c59; color: #cbd2d9; }
.live.on { background: #1f6f43; color: #e3f9e5; } .live.on::before { content: "\\25cf  "; color: #57d98a; }
main { padding: 16px 20px 40px; max-width: 1400px; margin: 0 auto; }
main.msg { max-width: 640px; padding-top: 60px; }
h1 { font-size: 18px; margin: 4px 0 12px; } h2 { font-size: 14px; margin: 20px 0 8px; }
h1 small, h2 small { color: var(--muted); font-weight: 400; margin-left: 6px; }
h3 { font-size: 12px; margin: 10px 0 4px; color: var(--muted); }
.head { display: flex; align-items: center; gap: 12px; } .head h1 { margin-right: auto; }
.tiles { display: grid; grid-template-columns: repeat(6, 1fr); gap: 10px; }
.tile { background: var(--card); border: 1px solid var(--line); border-left: 4px solid var(--pending);
  border-radius: 6px; padding: 10px 12px; color: var(--fg); display: flex; flex-direction: column; }
a.tile:hover { text-decoration: none; border-color: #b8c2cc; }
.tile b { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile span { font-weight: 600; } .tile small { color: var(--muted); }
.tile.s-processing { border-left-color: var(--processing); } .tile.s-completed { border-left-color: var(--ok); }
.tile.s-failed { border-left-color: var(--failed); } .tile.s-dead { border-left-color: var(--dead); }
.tile.lat { border-left-color: #7b61c9; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line);
  border-radius: 6px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); font-weight: 600;
  background: #fafbfc; }
tbody tr:hover { background: #f5f8fc; } tr.sel { background: #eef4fd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.cmd { max-width: 520px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
table.stats th { text-transform: none; font-size: 12px; color: var(--fg); background: none; font-weight: 500; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 11px; font-weight: 600;
  background: #e4e7eb; color: var(--pending); }
.badge.s-processing { background: #dce8fb; color: var(--processing); }
.badge.s-completed, .badge.s-alive, .badge.s-active { background: #ddf3e4; color: var(--ok); }
.badge.s-failed, .badge.s-stopping, .badge.s-paused { background: #fcefd9; color: #a8680a; }
.badge.s-dead, .badge.s-lost { background: #fbe1e1; color: var(--dead); }
.cols { display: grid; grid-template-columns: minmax(260px, 1fr) 3fr; gap: 20px; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 10px 16px; margin-top: 20px; }
.cols h2 { margin-top: 20px; } .cols .charts { margin-top: 47px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
figcaption { font-size: 12px; font-weight: 600; margin-bottom: 4px; }
figcaption small { font-weight: 400; color: var(--muted); }
.key { font-weight: 400; color: var(--muted); margin-left: 10px; }
.key::before { content: ""; display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 4px;
  vertical-align: -1px; background: #888; }
.key.ok::before { background: var(--ok); } .key.bad::before { background: var(--bad); }
.key.p50::before { background: var(--processing); } .key.p95::before { background: #7b61c9; }
.key.pending::before { background: var(--pending); } .key.failed::before { background: var(--failed); }
.key.processing::before { background: var(--processing); }
svg.chart { width: 100%; height: auto; display: block; }
svg.timeline { width: 100%; height: auto; display: block; background: var(--card); border: 1px solid var(--line);
  border-radius: 6px; padding: 6px 8px; margin-bottom: 8px; }
svg text { font-size: 10px; fill: var(--muted); }
svg .axis { stroke: var(--line); } svg .ok { fill: var(--ok); } svg .bad { fill: var(--bad); }
svg .run { fill: var(--processing); } svg .hit { fill: transparent; } svg g:hover .hit { fill: rgba(0,0,0,.05); }
svg polyline { fill: none; stroke-width: 1.6; } svg circle { stroke: none; }
svg .p50 { stroke: var(--processing); fill: var(--processing); } svg .p95 { stroke: #7b61c9; fill: #7b61c9; }
svg .pending { stroke: var(--pending); fill: var(--pending); } svg .failed { stroke: var(--failed); fill: var(--failed); }
svg .processing { stroke: var(--processing); fill: var(--processing); }
svg polyline.p50, svg polyline.p95, svg polyline.pending, svg polyline.failed, svg polyline.processing { fill: none; }
.filters { display: flex; gap: 8px; margin-bottom: 10px; }
input, select, button, .btn { font: inherit; padding: 4px 8px; border: 1px solid #c5ced6; border-radius: 4px;
  background: #fff; color: var(--fg); }
input[type=search] { width: 320px; }
button, .btn { cursor: pointer; background: #f0f3f6; display: inline-block; }
button:hover, .btn:hover { background: #e2e7ec; text-decoration: none; }
button.primary { background: var(--link); border-color: var(--link); color: #fff; }
button.danger, .btn.danger { color: var(--dead); border-color: #e8b4b4; }
button.small, .btn.small, a.small { font-size: 11px; padding: 1px 7px; font-weight: 400; }
form.inline { display: inline; margin: 0; }
.bar { margin: 8px 0; } .pager { margin: 10px 0; display: flex; gap: 14px; }
.flash { background: #e3f9e5; border: 1px solid #a6e3b5; padding: 6px 12px; border-radius: 4px; }
.note, .empty { color: var(--muted); }
dl.fields { display: grid; grid-template-columns: repeat(3, 100px minmax(0, 1fr)); gap: 4px 12px;
  background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; margin: 10px 0 0; }
dl.fields dt { color: var(--muted); } dl.fields dd { margin: 0; min-width: 0; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; }
pre.command { background: var(--card); border: 1px solid var(--line); padding: 8px 12px; border-radius: 6px;
  max-height: 240px; overflow: auto; }
pre.output { background: #1f2933; color: #e4e7eb; padding: 10px 12px; border-radius: 6px; max-height: 480px;
  overflow: auto; }
fieldset { border: 0; padding: 0; margin: 10px 0; display: flex; gap: 16px; }
@media (max-width: 900px) { .tiles { grid-template-columns: repeat(3, 1fr); } .cols, .charts { grid-template-columns: 1fr; } }
"""

_DASH_JS = r"""
// queuectl dashboard: live updates over server-sent events. The server sends
// change marks per topic; each region re-fetches its own HTML (rendered and
// escaped by the server) only when one of its topics changed. Nothing here
// builds HTML from data. Paused while the tab is hidden.
(function () {
  "use strict";
  var body = document.body;
  var marks = JSON.parse(body.getAttribute("data-marks") || "{}");
  var skew = parseFloat(body.getAttribute("data-now")) - Date.now() / 1000;
  var live = document.getElementById("live");
  var source = null, busy = {}, again = {}, last = {}, timer = {};

  function setLive(state, text) {
    live.className = "live " + state;
    live.textContent = text;
  }

  // One fetch per region at a time, and at most one a second: a busy queue
  // changes every few milliseconds; the page shows the latest within a second.
  function refresh(el) {
    var name = el.getAttribute("data-region");
    if (busy[name]) { again[name] = true; return; }
    var wait = (last[name] || 0) + 1000 - Date.now();
    if (wait > 0) {
      if (!timer[name]) { timer[name] = setTimeout(function () { timer[name] = null; refresh(el); }, wait); }
      return;
    }
    busy[name] = true;
    last[name] = Date.now();
    var url = new URL(location.href);
    url.searchParams.delete("done");
    url.searchParams.delete("n");
    url.searchParams.set("fragment", name);
    fetch(url.pathname + url.search, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        var checked = {};
        el.querySelectorAll("input[name=sel]:checked").forEach(function (c) { checked[c.value] = true; });
        el.innerHTML = html;
        el.querySelectorAll("input[name=sel]").forEach(function (c) { c.checked = !!checked[c.value]; });
        ages();
      })
      .catch(function () {})
      .then(function () {
        busy[name] = false;
        if (again[name]) { again[name] = false; refresh(el); }
      });
  }

  function onMarks(event) {
    var next = JSON.parse(event.data), changed = {};
    Object.keys(next).forEach(function (k) { if (next[k] !== marks[k]) { changed[k] = true; } });
    marks = next;
    document.querySelectorAll("[data-region]").forEach(function (el) {
      var topics = (el.getAttribute("data-topics") || "").split(" ");
      if (topics.some(function (t) { return changed[t]; })) { refresh(el); }
    });
  }

  function connect() {
    if (source || document.hidden || !window.EventSource) { return; }
    source = new EventSource("/events");
    source.onmessage = function (e) { setLive("on", "live"); onMarks(e); };
    source.onerror = function () { setLive("off", "reconnecting"); };
  }

  function disconnect() {
    if (source) { source.close(); source = null; }
    setLive("off", "paused");
  }

  function age(secs) {
    var a = Math.abs(secs), t;
    if (a < 60) { t = Math.floor(a) + "s"; }
    else if (a < 3600) { t = Math.floor(a / 60) + "m"; }
    else if (a < 86400) { t = Math.floor(a / 3600) + "h" + ("0" + Math.floor(a % 3600 / 60)).slice(-2) + "m"; }
    else { t = Math.floor(a / 86400) + "d" + ("0" + Math.floor(a % 86400 / 3600)).slice(-2) + "h"; }
    return secs < 0 ? "in " + t : t + " ago";
  }

  function ages() {
    var now = Date.now() / 1000 + skew;
    document.querySelectorAll("time[data-ts]").forEach(function (el) {
      el.textContent = age(now - parseFloat(el.getAttribute("data-ts")));
    });
  }

  document.addEventListener("change", function (e) {
    if (e.target.matches("input.all")) {
      var table = e.target.closest("table");
      table.querySelectorAll("input[name=sel]").forEach(function (c) { c.checked = e.target.checked; });
    }
  });
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { disconnect(); } else { connect(); }
  });
  setInterval(ages, 1000);
  connect();
})();
"""

_DASH_STATIC = {
    "app.css": ("text/css; charset=utf-8", _DASH_CSS),
    "app.js": ("text/javascript; charset=utf-8", _DASH_JS),
    "icon.svg": ("image/svg+xml", _DASH_ICON),
}


###############################################################################
# CLI #########################################################################
###############################################################################

EPILOG = """\
environment:
  QUEUECTL_DB                 database file (default: $XDG_DATA_HOME/queuectl/queue.db,
                              i.e. ~/.local/share/queuectl/queue.db), or a postgresql:// URL
  QUEUECTL_BUSY_TIMEOUT       how long to wait for another process's lock (default 30s)
  QUEUECTL_ALLOW_NETWORK_FS   set to 1 to allow a database on NFS/SMB (one host only)
  QUEUECTL_PG_LISTEN          set to 0 to make workers poll PostgreSQL instead of LISTEN
                              (PgBouncer in transaction mode)

exit codes: 0 ok, 1 error, 2 usage error, 124 timed out (wait, worker stop),
130 interrupted; `wait` exits with the failed job's exit code.
"""


COMMAND_HINT = "to enqueue a command, put it after --: queuectl enqueue -- COMMAND"


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors become one line (UsageError), not usage text + exit."""

        def error(self, message):
            where = self.prog.partition(" ")[2]
            raise UsageError("%s%s (see '%s --help')" % (where + ": " if where else "", message, self.prog))

        def parse_args(self, args=None, namespace=None):
            # argparse reports an unknown option of a subcommand from the top
            # parser; report it from the subcommand's, with its --help and a
            # close match.
            parsed, extras = self.parse_known_args(args, namespace)
            if extras:
                _unrecognized(self, args, extras)
            return parsed

    return argparse, Parser


def _unrecognized(parser, argv, extras):
    """Raise the usage error for unknown arguments, from the subcommand they were given to."""
    import argparse
    import difflib
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] != "--db")]
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    message = "unrecognized arguments: %s" % " ".join(extras)
    options = [o for a in parser._actions for o in a.option_strings]
    hint = difflib.get_close_matches(extras[0].partition("=")[0], options, 1, 0.75) \
        if extras[0].startswith("-") else []
    if hint:
        message += " (did you mean %s?)" % hint[0]
    elif parser.prog == "queuectl enqueue" and extras[0].startswith("-"):
        message += " (%s)" % COMMAND_HINT
    parser.error(message)


def _help_width():
    """The terminal's width as shutil.get_terminal_size() finds it, without
    importing shutil (argparse would, for every parser it builds)."""
    try:
        return max(int(os.environ["COLUMNS"]) - 2, 20)
    except (KeyError, ValueError):
        pass
    try:
        return max(os.get_terminal_size(sys.__stdout__.fileno()).columns - 2, 20)
    except (AttributeError, ValueError, OSError):
        return 78


def _int_arg(low):
    """The type of an integer option: from `low` up to what SQLite stores (a
    bigger one would fail in the query with OverflowError)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise _argtype_error("invalid integer %r" % text)
        if value < low:
            raise _argtype_error("must be at least %d, not %d" % (low, value) if low else "must not be negative")
        if value >= _INT64:
            raise _argtype_error("too large: %s (at most %d)" % (text, _INT64 - 1))
        return value
    return parse


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise _argtype_error("invalid port %r" % text)
    if not 0 <= value <= 65535:
        raise _argtype_error("must be 0-65535, not %d" % value)
    return value


def _duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise _argtype_error(str(e))


def _queue_arg(text):
    if not valid_queue_name(text):
        raise _argtype_error("invalid queue name %s: use 1-64 letters, digits and ._- (not starting with - or .)"
                             % printable(repr(text)))
    return text


def _queues_arg(text):
    names = [n.strip() for n in text.split(",")]
    for name in names:
        _queue_arg(name)
    return list(dict.fromkeys(names))


def _ids_arg(text):
    ids = [i.strip() for i in text.split(",")]
    for job_id in ids:
        if not valid_job_id(job_id):
            raise _argtype_error("invalid job id %s" % printable(repr(job_id)))
    return ids


def _env_arg(text):
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise _argtype_error("expected NAME=VALUE, not %s" % printable(repr(text)))
    try:
        check_env_name(name)
    except ValueError as e:
        raise _argtype_error(str(e))
    return name, value


def _unique_arg(text):
    try:
        return check_unique_key(text)
    except ValueError as e:
        raise _argtype_error(str(e))


def _limit_arg(text):
    if text.strip().lower() == "none":
        return None
    if text.strip() in ("0", "+0", "-0"):
        # Not "no limit" (nor "run nothing": that is `queue pause`).
        raise _argtype_error("must be at least 1, not 0 ('none' removes the limit; "
                             "'queue pause' stops new jobs)")
    return _int_arg(1)(text)


def _argtype_error(message):
    import argparse
    return argparse.ArgumentTypeError(message)


class _Skipped:
    """Stands in for the parsers of commands not being run (see build_parser)."""

    def __getattr__(self, name):
        return lambda *args, **kw: self


_SKIPPED = _Skipped()
COMMANDS = ("init", "enqueue", "worker", "status", "list", "show", "logs", "wait", "cancel", "retry", "dlq",
            "queue", "config", "stats", "purge", "dashboard")
#: Earlier designs' spellings of commands, accepted as they were (README: Aliases).
COMMAND_ALIASES = {"dlq-retry": ["dlq", "retry"]}


def _word_index(argv, start=0):
    """The index of the first word in argv[start:] that is not an option
    (nor --db's value), or None."""
    i = start
    while i < len(argv):
        arg = argv[i]
        if arg == "--db":
            i += 2
            continue
        if arg == "--" or not arg.startswith("-"):
            return i
        i += 1
    return None


def _command_word(argv):
    """The command named in argv (skipping global options), or None."""
    i = _word_index(argv)
    return argv[i] if i is not None and argv[i] in COMMANDS else None


def _expand_aliases(argv):
    """argv with the earlier designs' spellings put the current way:
    `dlq-retry ID` is `dlq retry ID`, `config KEY VALUE` is `config set KEY
    VALUE` and `config KEY` is `config get KEY`."""
    argv = list(argv)
    i = _word_index(argv)
    if i is None or argv[i] == "--":
        return argv
    if argv[i] in COMMAND_ALIASES:
        argv[i:i + 1] = COMMAND_ALIASES[argv[i]]
    elif argv[i] == "config":
        j = _word_index(argv, i + 1)
        if j is not None and argv[j] not in ("set", "get", "list", "--") and not _is_typo(argv[j]):
            values = _word_index(argv, j + 1)
            argv.insert(j, "set" if values is not None else "get")
    return argv


def _is_typo(word):
    """Is this word after `config` a mistyped action (`lst`) rather than a key?"""
    import difflib
    key = word.replace("-", "_")
    return key not in CONFIG_DEFAULTS and key not in CONFIG_ALIASES and \
        bool(difflib.get_close_matches(word, ("set", "get", "list"), 1))


def build_parser(only=None):
    """The argument parser; with `only`, just that command's part of it (the
    other commands' parsers cost start-up time and are not needed to parse)."""
    argparse, Parser = _parser_class()
    width = _help_width()

    def formatter(prog):
        return argparse.RawDescriptionHelpFormatter(prog, width=width)

    common = Parser(add_help=False, formatter_class=formatter)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="SQLite file or postgresql:// URL (default: $QUEUECTL_DB or "
                             "~/.local/share/queuectl/queue.db)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    json_opt = Parser(add_help=False, formatter_class=formatter)
    json_opt.add_argument("--json", action="store_true", help="print JSON")

    parser = Parser(prog="queuectl", description="A background job queue for shell commands, on SQLite or PostgreSQL.",
                    epilog=EPILOG, formatter_class=formatter,
                    parents=[common])
    parser.add_argument("--version", action="version", version="queuectl " + __version__)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    def add(subparsers, name, func, help, parents=(), **kw):
        if subparsers is _SKIPPED or (subparsers is sub and only not in (None, name)):
            return _SKIPPED
        p = subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  parents=[common] + list(parents), formatter_class=formatter, **kw)
        p.set_defaults(func=func)
        return p

    add(sub, "init", cmd_init, "create the database now (harmless if it exists) and print its path")

    p = add(sub, "enqueue", cmd_enqueue, "add jobs: a JSON object, --file, or a command after --",
            usage="queuectl enqueue [options] ('{\"command\": ...}' | --file PATH | -- COMMAND...)")
    p.add_argument("job", nargs="*", metavar="JSON | COMMAND",
                   help="a JSON job object, or (after --) the command to run")
    p.add_argument("-f", "--file", metavar="PATH",
                   help="read jobs from a file ('-' = stdin): a JSON object, array or JSON Lines")
    p.add_argument("--id", help="the job's id (default: generated)")
    p.add_argument("-p", "--priority", type=_int_arg(-_INT64), help="higher runs first (default 0)")
    p.add_argument("-r", "--max-retries", type=_int_arg(0), metavar="N",
                   help="retries after the first run (default: config max_retries)")
    p.add_argument("-t", "--timeout", type=_duration_arg, metavar="DURATION",
                   help="kill the job after this long (e.g. 60, 10m; default: config timeout)")
    p.add_argument("--delay", type=_duration_arg, metavar="DURATION", help="run no earlier than this from now")
    p.add_argument("--run-at", metavar="TIME", help="run no earlier than this ISO-8601 time (local if no offset)")
    p.add_argument("-q", "--queue", type=_queue_arg, metavar="NAME", help="the job's queue (default: default)")
    p.add_argument("--after", type=_ids_arg, metavar="ID[,ID...]",
                   help="run only after these jobs have completed (if one dies, this one goes to the DLQ)")
    p.add_argument("--unique", metavar="KEY", type=_unique_arg,
                   help="add nothing if an active (pending, failed or processing) job has this key: "
                        "print that job's id instead")
    p.add_argument("-e", "--env", action="append", type=_env_arg, metavar="NAME=VALUE",
                   help="set an environment variable for the job (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print [{\"id\": ..., \"created\": true|false}] (false: an active job with the "
                        "same unique key)")

    p = add(sub, "worker", None, "start or stop workers")
    wsub = p.add_subparsers(dest="worker_cmd", metavar="ACTION")
    wsub.required = True
    w = add(wsub, "start", cmd_worker_start, "run workers in the foreground")
    w.add_argument("-c", "--count", type=_int_arg(1), default=1, metavar="N",
                   help="number of worker processes (default 1)")
    w.add_argument("--once", action="store_true",
                   help="process every job that is due now, then exit (for cron)")
    w.add_argument("--force", action="store_true",
                   help="allow a --count above %d (or %d per CPU)" % (MAX_WORKERS, MAX_WORKERS_PER_CPU))
    w.add_argument("-q", "--queue", type=_queues_arg, metavar="NAME[,NAME...]",
                   help="serve only these queues (default: all)")
    w = add(wsub, "stop", cmd_worker_stop, "ask running workers to finish their jobs and exit")
    w.add_argument("--timeout", type=_duration_arg, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: wait until they have stopped)")

    add(sub, "status", cmd_status, "job counts per state and the active workers", parents=[json_opt])

    p = add(sub, "list", cmd_list, "list jobs, most recent last", parents=[json_opt])
    p.add_argument("-s", "--state", help="only jobs in this state (%s)" % ", ".join(STATES))
    p.add_argument("-n", "--limit", type=_int_arg(0), default=100, metavar="N",
                   help="show the N most recent (default 100; 0 = all)")

    p = add(sub, "show", cmd_show, "every field of a job and its run history", parents=[json_opt])
    p.add_argument("id", metavar="ID", help="the job's id (as enqueue printed it)")

    p = add(sub, "logs", cmd_logs, "captured stdout (to stdout) and stderr (to stderr) of a run")
    p.add_argument("id", metavar="ID", help="the job's id (as enqueue printed it)")
    p.add_argument("-a", "--attempt", type=_int_arg(1), metavar="N",
                   help="the Nth run as numbered by 'show' (default: the last)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="print a running job's output as it comes (waiting for the job to start) and exit "
                        "with its exit code when the run ends")

    p = add(sub, "wait", cmd_wait, "wait until jobs are completed or dead; exit with the failure's code")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_duration_arg, default=None, metavar="DURATION",
                   help="give up after this long (exit 124)")

    p = add(sub, "cancel", cmd_cancel, "cancel jobs: waiting ones go to the DLQ, running ones are killed")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = add(sub, "retry", cmd_retry, "run failed jobs now instead of at their retry time")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = add(sub, "queue", None, "named queues: list them, limit, pause or resume one")
    qsub = p.add_subparsers(dest="queue_cmd", metavar="ACTION")
    qsub.required = True
    add(qsub, "list", cmd_queue_list, "every queue with its job counts, limit and whether it is paused",
        parents=[json_opt])
    q = add(qsub, "set", cmd_queue_set, "set a queue's concurrency limit (across every pool and host)")
    q.add_argument("name", type=_queue_arg)
    q.add_argument("--limit", type=_limit_arg, required=True, metavar="N",
                   help="at most N of its jobs run at once ('none': no limit)")
    q = add(qsub, "pause", cmd_queue_pause, "stop starting jobs of a queue (running ones finish)")
    q.add_argument("name", type=_queue_arg)
    q = add(qsub, "resume", cmd_queue_resume, "start jobs of a paused queue again")
    q.add_argument("name", type=_queue_arg)

    p = add(sub, "dlq", None, "the dead letter queue: list or retry dead jobs")
    dsub = p.add_subparsers(dest="dlq_cmd", metavar="ACTION")
    dsub.required = True
    add(dsub, "list", cmd_dlq_list, "list dead jobs", parents=[json_opt])
    d = add(dsub, "retry", cmd_dlq_retry, "move dead jobs back to pending (attempts reset, due now)")
    d.add_argument("ids", nargs="*", metavar="ID")
    d.add_argument("--all", action="store_true", help="retry every dead job")
    d.add_argument("--reset-retries", action="store_true",
                   help="give the jobs the current config max_retries (default: keep their own)")

    p = add(sub, "config", None, "get or set configuration (stored in the database)")
    csub = p.add_subparsers(dest="config_cmd", metavar="ACTION")
    csub.required = True
    keys = "keys:\n" + "".join("  %-13s %s\n" % (k, v) for k, v in CONFIG_HELP.items())
    c = add(csub, "set", cmd_config_set, "set a configuration value", epilog=keys)
    c.add_argument("key", metavar="KEY", help="a setting (listed below; '-' for '_' is fine)")
    c.add_argument("value", metavar="VALUE")
    c = add(csub, "get", cmd_config_get, "print a configuration value", epilog=keys)
    c.add_argument("key", metavar="KEY", help="a setting (listed below)")
    add(csub, "list", cmd_config_list, "print every configuration value", parents=[json_opt])

    add(sub, "stats", cmd_stats, "what happened over the last hour and day", parents=[json_opt])

    p = add(sub, "purge", cmd_purge, "delete finished jobs and their logs (completed by default)")
    p.add_argument("--older-than", type=_duration_arg, default=0.0, metavar="DURATION",
                   help="only jobs finished at least this long ago (e.g. 7d; default: all)")
    p.add_argument("-s", "--state", action="append", choices=("completed", "dead"),
                   help="completed (default) or dead; repeat for both. The DLQ is only purged when named")

    p = add(sub, "dashboard", cmd_dashboard, "serve a live web dashboard and Prometheus /metrics")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else is reachable from other hosts)")
    p.add_argument("--port", type=_port, default=DASHBOARD_PORT,
                   help="port (default %d; 0 picks a free one)" % DASHBOARD_PORT)
    p.add_argument("--read-only", action="store_true", help="show the queue; offer no actions")
    p.add_argument("--token-file", metavar="PATH",
                   help="keep the access token in this file (created 0600) so it survives restarts")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name the dashboard is reached by (e.g. behind a proxy); repeatable")
    return parser


def _db_path(args):
    """--db, else $QUEUECTL_DB, else the default path."""
    path = getattr(args, "db", None)
    if path == "":
        raise UsageError("--db needs a path, not an empty string (leave it out to use $QUEUECTL_DB "
                         "or the default)")
    return path or default_db_path()


def _open_store(args, create=False, note=True):
    """The store named by --db / $QUEUECTL_DB / the default path. Only commands
    that write jobs or settings create the file; the others read an empty
    queue where there is none, and say so (unless not `note`: commands about
    given jobs say it in their "not found" error)."""
    store = open_store(_db_path(args), create=create)
    if store.missing and note:
        _err("no database at %s yet, so the queue is empty (a mistyped --db or $QUEUECTL_DB?)"
             % store.missing)
    return store


def cmd_init(args):
    path = _db_path(args)
    existed = store_exists(path)
    with open_store(path) as store:
        location = store.location()
    _err("database %s" % ("exists; nothing changed" if existed else "created"))
    sys.stdout.write(location + "\n")
    return EXIT_OK


def _read_input(path):
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise QueueError("cannot read %s: %s" % (path, e.strerror or e))
        name = path
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise QueueError("%s: invalid UTF-8 at byte %d" % (name, e.start))


def cmd_enqueue(args):
    now = time.time()
    try:
        cwd = os.getcwd()
    except OSError as e:
        raise QueueError("cannot read the current directory: %s" % (e.strerror or e))
    if not _encodable(cwd):
        # A job runs where it was enqueued, and the database keeps text as UTF-8.
        shown = cwd.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise QueueError("the current directory %s is not valid UTF-8, so it cannot be stored as the "
                         "job's directory; enqueue from another directory" % printable(shown))
    flags = {}
    for name in ("id", "priority", "max_retries", "timeout", "delay", "run_at", "queue", "after", "unique"):
        value = getattr(args, name)
        if value is not None:
            flags[name] = value
    if args.env:
        flags["env"] = dict(args.env)
    if args.file is not None:
        if args.job:
            raise UsageError("give jobs either with --file or as an argument, not both")
        where_objs = _parse_or_fail(_read_input(args.file))
    elif args.command_form:
        if not args.job:
            raise UsageError("no command after --")
        command = args.job[0] if len(args.job) == 1 else _shlex_join(args.job)
        where_objs = [("", {"command": command})]
    else:
        if len(args.job) != 1:
            raise UsageError("expected one JSON job object (%s)" % COMMAND_HINT)
        where_objs = _parse_or_fail(args.job[0], hint=True)
    jobs = []
    for where, obj in where_objs:
        try:
            obj = _job_aliases(obj)
        except ValueError as e:
            raise QueueError("%s%s" % (where, e))
        if isinstance(obj, dict) and flags:
            defaults = dict(flags)
            if "run_at" in obj or "delay" in obj:
                # The job's own time wins over a flag's, whichever form each has.
                defaults.pop("run_at", None)
                defaults.pop("delay", None)
            if isinstance(obj.get("env"), dict) and "env" in defaults:
                defaults["env"] = dict(defaults["env"], **obj["env"])   # -e adds to the JSON's env
                obj = dict(obj, env=defaults["env"])
            obj = dict(defaults, **obj)     # flags are defaults for fields the JSON leaves out
        try:
            jobs.append(validate_job(obj, cwd, now))
        except ValueError as e:
            raise QueueError("%s%s" % (where, e))
    if len(jobs) > 1:
        for name in ("id", "unique"):
            if name in flags:
                # One id or key for every job would add the first and drop the rest.
                raise UsageError("--%s cannot be used with several jobs (give each its own \"%s\" in the "
                                 "JSON)" % (name, name))
    with _open_store(args, create=True) as store:
        added = store.submit(jobs)      # created now, by the store's clock (after connecting)
        # A job that runs after a dead one is dead from the start: say so.
        states = store.states([job_id for (job_id, created), job in zip(added, jobs)
                               if created and job.get("after")])
    for job_id, (state, _, outcome) in states.items():
        if state == "dead":
            _err("job %s went to the DLQ at once: %s (a 'dlq retry' of that one re-arms it)" % (job_id, outcome))
    if args.json:
        print_json([{"id": job_id, "created": created} for job_id, created in added])
        return EXIT_OK
    for (job_id, created), job in zip(added, jobs):
        if not created:
            _err("job %s has unique key %s and is still active: nothing added" % (job_id, printable(job["unique"])))
    sys.stdout.write("".join(job_id + "\n" for job_id, _ in added))
    return EXIT_OK


def _shlex_join(words):
    import shlex
    return " ".join(shlex.quote(w) for w in words)


def _parse_or_fail(text, hint=False):
    try:
        return parse_jobs_text(text)
    except ValueError as e:
        if hint and not text.lstrip().startswith(("{", "[")):
            raise QueueError("%s (%s)" % (e, COMMAND_HINT))
        raise QueueError(str(e))
    except RecursionError:
        raise QueueError("invalid JSON: nested too deeply")


def _check_worker_count(count, force):
    """Refuse a --count far above what the machine can run (unless `force`)
    or above the file-descriptor limit, which is raised if it can be."""
    import resource
    cpus = os.cpu_count() or 1
    limit = max(MAX_WORKERS, MAX_WORKERS_PER_CPU * cpus)
    if count > limit and not force:
        raise UsageError("--count %d is more than %d workers (%d per CPU, at least %d; this machine has %d "
                         "CPU%s) and each is a process; add --force if you mean it"
                         % (count, limit, MAX_WORKERS_PER_CPU, MAX_WORKERS, cpus, "" if cpus == 1 else "s"))
    need = FDS_PER_WORKER * count + SUPERVISOR_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and need > soft:
        if hard != resource.RLIM_INFINITY and need > hard:
            raise QueueError("--count %d needs about %d open files in the supervisor, more than its limit "
                             "of %d (ulimit -Hn); raise the limit or start fewer workers" % (count, need, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def cmd_worker_start(args):
    _check_worker_count(args.count, args.force)
    db_path = _db_path(args)
    # Open once here so that a bad path or a newer schema is one clear error,
    # before any process starts; the connection is closed before forking.
    with open_store(db_path) as store:
        store.check_writable()
        known = {q["name"] for q in store.queues()}
    for name in args.queue or ():
        if name not in known:
            # Not an error (its jobs may come later), but a typo would idle silently.
            _err("note: no job or setting names queue %s yet" % name)
    return Supervisor(db_path, count=args.count, once=args.once, queues=args.queue).run()


def cmd_worker_stop(args):
    with _open_store(args) as store:
        running, lost_rows = store.request_stop()
        _tell_lost(lost_rows, store.now())
        waiting = {w["id"]: w for w in running}
        if not waiting:
            _err("no workers running")
            return EXIT_OK
        _err("asked %d worker%s to stop; waiting for running jobs to finish"
             % (len(waiting), "" if len(waiting) == 1 else "s"))
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        n_lost = 0
        while True:
            # One that dies meanwhile has stopped too; one lost (its host died) is not waited for.
            now = store.now()
            judged = {"alive": [], "dead": [], "lost": []}
            for w in store.workers():
                if w["id"] in waiting:
                    judged[store.judge_worker(w, now)].append(w)
            if judged["dead"] or judged["lost"]:
                store.forget_workers([w["id"] for w in judged["dead"]], [w["id"] for w in judged["lost"]], now)
                _tell_lost(judged["lost"], now)
                for w in judged["lost"]:
                    del waiting[w["id"]]
                    n_lost += 1
            remaining = judged["alive"]
            if not remaining:
                _err("stopped %d worker%s%s" % (len(waiting), "" if len(waiting) == 1 else "s",
                                                "; %d lost" % n_lost if n_lost else ""))
                return EXIT_OK
            if deadline is not None and time.monotonic() >= deadline:
                _err("timed out: %d worker%s still running (pid %s)" % (
                    len(remaining), "" if len(remaining) == 1 else "s",
                    ", ".join(str(w["pid"]) for w in remaining)))
                return EXIT_TIMEOUT
            time.sleep(0.1)


def _tell_lost(workers, now):
    """`worker stop` does not wait for a worker that is lost (Store.judge_worker)."""
    for w in workers:
        _err("not waiting for worker %s: no heartbeat for %.0fs%s" % (
            w["id"], now - w["heartbeat_at"],
            "; its job %s is taken back once its lease expires" % w["job_id"] if w["job_id"] else ""))


def _err(message):
    sys.stderr.write("queuectl: %s\n" % message)


def cmd_status(args):
    with _open_store(args) as store:
        counts = store.counts()
        workers = store.workers()
        queues = store.queues()
        now = store.now()
    for w in workers:
        w["alive"] = worker_alive(store, w, now)
    if args.json:
        print_json(status_to_json(counts, workers, queues))
        return EXIT_OK
    print_table(("STATE", "JOBS"), [(s, counts[s]) for s in STATES])
    sys.stdout.write("\n")
    paused = [q["name"] for q in queues if q["paused"]]
    if paused:
        sys.stdout.write("paused queue%s: %s\n\n" % ("" if len(paused) == 1 else "s", ", ".join(paused)))
    if not workers:
        sys.stdout.write("no active workers\n")
        return EXIT_OK
    rows = []
    for w in workers:
        note = "" if w["alive"] else " (lost)"
        if w["stop_requested"] and w["alive"]:
            note = " (stopping)"
        rows.append((w["pid"], w["host"], format_local(w["started_at"]), w["job_id"] or "-",
                     "%.0fs ago%s" % (max(0, now - w["heartbeat_at"]), note)))
    print_table(("PID", "HOST", "STARTED", "JOB", "HEARTBEAT"), rows)
    return EXIT_OK


def _check_state(state):
    if state is not None and state not in STATES:
        raise QueueError("unknown state %r (valid: %s)" % (state, ", ".join(STATES)))


def _print_jobs(jobs, as_json, dlq=False, paused=()):
    if as_json:
        print_json([job_to_json(j) for j in jobs])
        return
    if not jobs:
        _err("no jobs")
        return
    if dlq:
        rows = [(j["id"], _attempts(j), j["outcome"] or "-", format_local(j["updated_at"]), j["command"])
                for j in jobs]
        print_table(("ID", "ATTEMPTS", "LAST OUTCOME", "DIED", "COMMAND"), rows)
        return
    # The QUEUE column only where there is more than the default queue to show.
    queues = any(j["queue"] != DEFAULT_QUEUE or j["queue"] in paused for j in jobs)
    rows = []
    for j in jobs:
        when = j["run_at"] if j["state"] in DUE_STATES else j["updated_at"]
        queue = (j["queue"] + (" (paused)" if j["queue"] in paused else ""),) if queues else ()
        rows.append((j["id"], j["state"]) + queue + (_attempts(j), j["priority"], format_local(when),
                    "-" if j["exit_code"] is None else j["exit_code"], j["command"]))
    print_table(("ID", "STATE") + (("QUEUE",) if queues else ()) +
                ("ATTEMPTS", "PRI", "RUN AT / UPDATED", "EXIT", "COMMAND"), rows)


def cmd_list(args):
    _check_state(args.state)
    with _open_store(args) as store:
        jobs = store.list_jobs(args.state, args.limit or None)
        paused = {q["name"] for q in store.queues() if q["paused"]}
    _print_jobs(jobs, args.json, paused=paused)
    return EXIT_OK


def cmd_show(args):
    with _open_store(args, note=False) as store:
        job = store.get(args.id)
        runs = store.runs(args.id)
        data = job_detail_to_json(store, job, runs)
    if args.json:
        print_json(data)
        return EXIT_OK
    fields = [("id", job["id"]), ("command", job["command"]), ("state", job["state"]),
              ("attempts", _attempts(job)), ("priority", job["priority"]),
              ("run at", format_local(job["run_at"])),
              ("timeout", format_seconds(job["timeout"] or None)),
              ("created", format_local(job["created_at"])), ("updated", format_local(job["updated_at"])),
              ("exit code", "-" if job["exit_code"] is None else job["exit_code"]),
              ("outcome", job["outcome"] or "-"), ("cwd", job["cwd"]), ("queue", job["queue"])]
    if data["after"]:
        fields.append(("after", ", ".join("%s (%s)" % (d["id"], d["state"] or "purged") for d in data["after"])))
    if job["unique_key"] is not None:
        fields.append(("unique", job["unique_key"]))
    for name, value in sorted(data["env"].items()):
        fields.append(("env", "%s=%s" % (name, value)))
    if data["waiting"]:
        fields.append(("waiting", data["waiting"]))
    if job["worker_id"]:
        fields.append(("worker", job["worker_id"]))
    out = "".join("%-10s %s\n" % (k + ":", printable(v)) for k, v in fields)
    sys.stdout.write(out + "\n")
    if not runs:
        sys.stdout.write("no runs yet\n")
        return EXIT_OK
    rows = [(r["run"], r["attempt"], format_local(run["started_at"]), format_local(run["finished_at"]),
             format_seconds(r["duration"]), "-" if r["exit_code"] is None else r["exit_code"], r["outcome"],
             "%d/%d" % (r["stdout_bytes"], r["stderr_bytes"]))
            for r, run in zip(data["runs"], runs)]
    print_table(("RUN", "ATTEMPT", "STARTED", "FINISHED", "DURATION", "EXIT", "OUTCOME", "OUT/ERR BYTES"), rows)
    return EXIT_OK


def _write_output(stream, data):
    """Bytes to stdout (1) or stderr (2), as they are."""
    out = sys.stdout if stream == 1 else sys.stderr
    out.flush()
    out.buffer.write(data)
    out.buffer.flush()


def follow_logs(store, job_id, poll=0.05):
    """`logs --follow`: wait for the job to start if it is pending, print its
    output as the worker stores it, and when the run ends, the rest from the
    run's record. A job that is not pending or running: its last run's output.
    Returns the run's exit code (1 if it has none)."""
    told, look = {}, 0.0
    while True:
        state, run, exit_code, finished = store.run_state(job_id)
        if state != "pending":
            break
        if time.monotonic() >= look:
            look = time.monotonic() + 1.0
            _say_why_waiting(store, job_id, told)
        time.sleep(poll)
    if run == 0:
        raise QueueError("job %r never ran (it is %s)" % (job_id, state))
    printed = {1: 0, 2: 0}
    last = 0

    def emit(stream, pos, data):
        """Print what of `data` (at `pos` in its stream) is new, saying what was missed before it."""
        if pos + len(data) <= printed[stream]:
            return
        if pos > printed[stream]:
            _err("[... %d bytes of output not kept while following ...]" % (pos - printed[stream]))
        _write_output(stream, data[max(0, printed[stream] - pos):])
        printed[stream] = pos + len(data)
    while state == "processing" and not finished:
        for chunk_id, stream, pos, data in store.live_output(job_id, run, last):
            last = chunk_id
            emit(stream, pos, data)
        state, run_now, exit_code, finished = store.run_state(job_id)
        if run_now != run:
            break       # taken back and started again: this run's record is complete
        time.sleep(poll)
    _, _, out, err = store.run_output(job_id, run)
    # The stored output is all of it up to OUTPUT_LIMIT a stream, else its
    # head and tail: print what was not printed live, where it is there.
    for stream, data in ((1, out), (2, err)):
        for pos, part in _Capture.parts(data):
            emit(stream, pos, part)
    exit_code = store.runs(job_id)[run - 1]["exit_code"]
    return EXIT_ERROR if exit_code is None else exit_code


def cmd_logs(args):
    if args.follow:
        if args.attempt is not None:
            raise UsageError("--follow shows the current run; it cannot be used with --attempt")
        with _open_store(args, note=False) as store:
            store.get(args.id)
            return follow_logs(store, args.id)
    with _open_store(args, note=False) as store:
        store.get(args.id)
        found = store.run_output(args.id, args.attempt)
    if found is None:
        if args.attempt is None:
            raise QueueError("job %r has not run yet" % args.id)
        raise QueueError("job %r has no run %d (see 'queuectl show %s')" % (args.id, args.attempt, args.id))
    run, finished, out, err = found
    if not finished and not out and not err:
        _err("job %s is running (run %d): its output is stored when the run ends" % (args.id, run))
        return EXIT_OK
    sys.stdout.flush()
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    sys.stderr.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.buffer.flush()
    return EXIT_OK


def _say_why_waiting(store, job_id, told):
    """Say why a job waits, once, and again when the reason changes
    (`told`: {job id: the reason said last})."""
    try:
        reason = waiting_reason(store, store.get(job_id))
    except JobNotFound:
        raise _deleted_while_waiting(job_id)
    if reason and told.get(job_id) != reason:
        _err("job %s: %s" % (job_id, reason))
    told[job_id] = reason


def _deleted_while_waiting(job_id):
    return QueueError("job %r no longer exists: it was deleted while waiting "
                      "(purge or the retention setting)" % job_id)


def cmd_wait(args):
    ids = list(dict.fromkeys(args.ids))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with _open_store(args, note=False) as store:
        states = store.states(ids)
        for job_id in ids:
            if job_id not in states:
                raise JobNotFound(job_id, store.missing)
        delay = 0.05
        told = {}
        while True:
            pending = [i for i in ids if states[i][0] not in ("completed", "dead")]
            if not pending:
                break
            for job_id in pending[:10]:
                if states[job_id][0] != "processing":
                    _say_why_waiting(store, job_id, told)
                else:
                    told[job_id] = None
            if deadline is not None and time.monotonic() >= deadline:
                _err("timed out waiting for %d job%s: %s" % (
                    len(pending), "" if len(pending) == 1 else "s", " ".join(pending)))
                return EXIT_TIMEOUT
            version = store.data_version()
            end = time.monotonic() + delay
            while time.monotonic() < end and store.data_version() == version:
                time.sleep(store.change_poll_seconds)
            delay = min(delay * 1.5, 1.0)
            now = store.states(pending)
            for job_id in pending:
                if job_id not in now:
                    raise _deleted_while_waiting(job_id)
            states.update(now)
    code = EXIT_OK
    for job_id in ids:
        state, exit_code, outcome = states[job_id]
        if state != "dead":
            continue
        if outcome == "cancelled":
            # A cancelled job's exit code is its last run's, which did not end it.
            _err("job %s is dead (cancelled)" % job_id)
            exit_code = None
        else:
            _err("job %s is dead (%s)" % (job_id, "exit %d" % exit_code if exit_code is not None
                                          else "no exit code"))
        if code == EXIT_OK:
            code = exit_code if exit_code else EXIT_ERROR
    return code


def cmd_cancel(args):
    with _open_store(args, note=False) as store:
        result = store.cancel(list(dict.fromkeys(args.ids)))
    for job_id, what in result.items():
        _err("job %s %s" % (job_id, "cancelled (moved to DLQ)" if what == "dead"
                            else "is running: its worker will kill it and move it to the DLQ"))
    return EXIT_OK


def cmd_retry(args):
    with _open_store(args, note=False) as store:
        ids = store.retry_failed(list(dict.fromkeys(args.ids)))
    _err("%d job%s due now" % (len(ids), "" if len(ids) == 1 else "s"))
    return EXIT_OK


def cmd_queue_list(args):
    with _open_store(args) as store:
        queues = store.queues()
        running = {q["name"]: store.queue_state(q["name"])["running"] for q in queues}
    if args.json:
        print_json([{"name": q["name"], "limit": q["max_running"], "paused": bool(q["paused"]),
                     "running": running[q["name"]], "counts": q["counts"]} for q in queues])
        return EXIT_OK
    print_table(("QUEUE", "LIMIT", "PAUSED") + tuple(s.upper() for s in STATES),
                [(q["name"], "-" if q["max_running"] is None else q["max_running"],
                  "yes" if q["paused"] else "no") + tuple(q["counts"][s] for s in STATES) for q in queues])
    return EXIT_OK


def _queue_change(args, message, **settings):
    # Only a pause or a limit makes a database (and a queue) where there is none.
    with _open_store(args, create=Store.makes_queue(settings), note=False) as store:
        if store.missing:
            raise QueueError("no queue %r: no database at %s yet (a mistyped --db or $QUEUECTL_DB?)"
                             % (args.name, store.missing))
        existed = store.set_queue(args.name, **settings)
        if existed is None:
            names = [q["name"] for q in store.queues()]
            raise QueueError("no queue %r (queues: %s)" % (args.name, ", ".join(names) or "none yet"))
    _err("queue %s %s%s" % (args.name, message, "" if existed else " (a new queue: it has no jobs yet)"))
    return EXIT_OK


def cmd_queue_set(args):
    return _queue_change(args, "limit: %s" % ("none" if args.limit is None else
                                              "%d running at once" % args.limit), max_running=args.limit)


def cmd_queue_pause(args):
    return _queue_change(args, "paused: running jobs finish, no new ones start", paused=1)


def cmd_queue_resume(args):
    return _queue_change(args, "resumed", paused=0)


def cmd_dlq_list(args):
    with _open_store(args) as store:
        jobs = store.list_jobs("dead")
    _print_jobs(jobs, args.json, dlq=True)
    return EXIT_OK


def cmd_dlq_retry(args):
    if args.all == bool(args.ids):
        raise UsageError("give job ids or --all, not both or neither")
    with _open_store(args, note=args.all) as store:
        given = None if args.all else list(dict.fromkeys(args.ids))
        ids = store.retry_dead(given, reset_retries=args.reset_retries)
    followed = 0 if given is None else len(ids) - len(given)
    _err("%d job%s moved back to pending%s" % (
        len(ids), "" if len(ids) == 1 else "s",
        "" if not followed else " (%d with a job %s depend%s on)" % (
            followed, "it" if followed == 1 else "they", "s" if followed == 1 else "")))
    return EXIT_OK


def _config_key(key):
    k = key.replace("-", "_")
    k = CONFIG_ALIASES.get(k, k)
    if k not in CONFIG_DEFAULTS:
        import difflib
        hint = difflib.get_close_matches(k, list(CONFIG_DEFAULTS) + list(CONFIG_ALIASES), 1)
        raise QueueError("unknown config key %r%s (valid: %s)" % (
            key, " (did you mean %r?)" % CONFIG_ALIASES.get(hint[0], hint[0]) if hint else "",
            ", ".join(CONFIG_DEFAULTS)))
    return k


def parse_config_value(key, text):
    """Validate a config value given as text; returns the value to store."""
    try:
        if key == "max_retries":
            value = int(text)
            if not 0 <= value <= 1000000:
                raise ValueError
            return value
        if key == "backoff_base":
            value = float(text)
            if not 1 <= value <= 1000:
                raise ValueError
            return value
        if key in NONE_MEANS:
            if text.strip().lower() in ("none", "null"):
                return None
            if parse_duration(text) == 0:
                raise QueueError("invalid value %r for %s: zero is ambiguous here; use 'none' (%s) "
                                 "or a positive duration" % (text, key, NONE_MEANS[key]))
        return parse_duration(text)
    except ValueError:
        raise QueueError("invalid value %r for %s: expected %s" % (text, key, CONFIG_HELP[key]))


def _config_text(value):
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _config_shown(key, value):
    """A value for people: a duration also in its largest whole unit, as it
    was likely given (`604800 (7d)`); the seconds stay, as `config get` prints them."""
    text = _config_text(value)
    if key in ("backoff_max", "timeout", "retention") and value:
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return "%s (%d%s)" % (text, value // seconds, unit)
    return text


def cmd_config_set(args):
    key = _config_key(args.key)
    value = parse_config_value(key, args.value)
    with _open_store(args, create=True) as store:
        store.set_config(key, value)
    _err("%s set to %s" % (key, _config_text(value)))
    return EXIT_OK


def cmd_config_get(args):
    key = _config_key(args.key)
    with _open_store(args) as store:
        value = store.config()[key]
    sys.stdout.write(_config_text(value) + "\n")
    return EXIT_OK


def cmd_config_list(args):
    with _open_store(args) as store:
        config = store.config()
    if args.json:
        print_json(config)
    else:
        print_table(("KEY", "VALUE", "MEANING"),
                    [(k, _config_shown(k, v), CONFIG_HELP[k]) for k, v in config.items()])
    return EXIT_OK


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def compute_stats(rows, now, window):
    """Summary of finished runs (finished_at, duration, result_state, outcome) in a window."""
    rows = [r for r in rows if r[0] >= now - window]
    completed = sum(1 for r in rows if r[2] == "completed")
    failed = sum(1 for r in rows if r[2] in ("failed", "dead"))
    dead = sum(1 for r in rows if r[2] == "dead")
    durations = sorted(r[1] for r in rows if r[1] is not None)
    finished = completed + failed
    return {
        "completed": completed,
        "failed_runs": failed,
        "dead": dead,
        "success_rate": round(completed / finished, 4) if finished else None,
        "duration_p50": _percentile(durations, 0.50),
        "duration_p95": _percentile(durations, 0.95),
        "duration_max": durations[-1] if durations else None,
        "throughput_per_min": round(completed / (window / 60.0), 3),
    }


def cmd_stats(args):
    with _open_store(args) as store:
        now = store.now()
        rows = store.finished_runs(now - 86400)
        counts = store.counts()
    stats = {"last_hour": compute_stats(rows, now, 3600), "last_day": compute_stats(rows, now, 86400),
             "counts": counts}
    if args.json:
        print_json(stats)
        return EXIT_OK

    def pct(v):
        return "-" if v is None else "%.1f%%" % (v * 100)

    labels = [("completed", "completed", str), ("failed runs", "failed_runs", str), ("dead", "dead", str),
              ("success rate", "success_rate", pct), ("duration p50", "duration_p50", format_seconds),
              ("duration p95", "duration_p95", format_seconds),
              ("duration max", "duration_max", format_seconds),
              ("throughput", "throughput_per_min", lambda v: "%g/min" % v)]
    print_table(("", "LAST HOUR", "LAST DAY"),
                [(label, fmt(stats["last_hour"][key]), fmt(stats["last_day"][key]))
                 for label, key, fmt in labels])
    return EXIT_OK


def cmd_purge(args):
    states = sorted(set(args.state or ["completed"]))
    with _open_store(args) as store:
        before = store.now() - args.older_than
        counts = [(store.purge([state], before), state) for state in states]
    _err("purged " + ", ".join("%d %s job%s" % (n, state, "" if n == 1 else "s") for n, state in counts))
    return EXIT_OK


def cmd_dashboard(args):
    for name in args.allow_host:
        if not name or any(c in name for c in "/ \t@") or not name.isascii():
            raise UsageError("dashboard: invalid --allow-host %r (a host name, no port or scheme)" % name)
    return run_dashboard(_db_path(args), host=args.host, port=args.port,
                         read_only=args.read_only, token_file=args.token_file, allow_hosts=args.allow_host)


def main(argv=None):
    """Run the command line; returns the exit code (never raises for user errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        # A locale that cannot encode a command (ISO-8859-1 and a check mark):
        # print it escaped rather than fail half-way through a table.
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
    try:
        argv = _expand_aliases(argv)
        parser = build_parser(only=_command_word(argv))
        if _word_index(argv) is None and not {"-h", "--help", "--version"} & set(argv):
            sys.stderr.write(parser.format_help())     # a bare `queuectl`
            return EXIT_USAGE
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:          # --help and --version
            return e.code if isinstance(e.code, int) else EXIT_OK
        args.command_form = "--" in argv
        code = args.func(args)
        sys.stdout.flush()      # inside the try: a write error is ours to report
        return code
    except QueueError as e:
        sys.stderr.write("queuectl: error: %s\n" % str(e).replace("\n", " "))
        if debug:
            raise
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `queuectl list | head`: the reader left; say nothing more.
        _silence_stdout()
        return EXIT_ERROR
    except OSError as e:
        # stdout on a full disk, say: one line, and no second failure at exit.
        sys.stderr.write("queuectl: error: cannot write output: %s\n" % (e.strerror or e))
        _silence_stdout()
        return EXIT_ERROR


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main_and_exit():
    """Run the command line as a program: main(), then exit at once, without
    tearing the interpreter down object by object (~20 ms after a worker pool
    has stopped, more than the pool takes to stop; a few ms after `enqueue`).
    Nothing is left to clean up by then: commands close their database, the
    pool has reaped its workers, and output is flushed here."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_OK if code is None else code)


if __name__ == "__main__":
    main_and_exit()
