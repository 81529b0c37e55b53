#!/bin/sh
"""exec" python3 -c '
# Run as a command (installed by copying, as README shows), this file starts as
# a shell script: sh reads this line only and execs Python on the byte-compiled
# copy of the file kept in ~/.cache/queuectl, so a call does not compile 3,000
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
sys.exit(module.main())
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
    "timeout": "default job timeout (duration, or 'none')",
    "retention": "workers delete completed jobs older than this (duration, or 'none'); never dead ones",
}

#: A claim is a lease for this long; the worker renews it while the job runs.
LEASE_SECONDS = 30.0
#: How often a worker renews its lease and checks for stop/cancel requests.
HEARTBEAT_SECONDS = 2.0
#: A worker not heard of for this long is removed from the workers table.
FORGET_WORKER_SECONDS = 600.0
#: How long a heartbeat waits for the write lock before trying again later.
HEARTBEAT_BUSY_MS = 200
#: After SIGTERM to a job's process group, SIGKILL follows after this long.
KILL_GRACE_SECONDS = 5.0
#: After a job's shell exits, how long to keep reading output that leftover
#: processes in its group still write, before they are killed.
EXIT_GRACE_SECONDS = 0.5
#: Captured bytes kept per stream and run: the first and last half of this.
OUTPUT_LIMIT = 1024 * 1024
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
#: How often an idle worker looks for new work (a cheap read of a counter):
#: every 2 ms at first, backing off to every 25 ms (under 1% of a core;
#: a wake-up costs more than the read).
IDLE_POLL_SECONDS = (0.002, 0.025)
#: An idle worker re-runs the full claim query at least this often (for jobs
#: whose run_at passes without any write to the database).
IDLE_CLAIM_SECONDS = 0.5

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
SCHEMA_VERSION = 2

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
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_due ON jobs (priority DESC, run_at, seq)
    WHERE state IN ('pending', 'failed');
CREATE INDEX jobs_state ON jobs (state, seq);

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

-- Per-state job counts, so that `status` costs the same with a thousand jobs
-- or a million. Triggers keep them on UPDATE and DELETE; Store.enqueue, the
-- only INSERT, adds its rows itself (a per-row trigger tripled its cost).
CREATE TABLE counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO counts (state, n) VALUES
    ('pending', 0), ('processing', 0), ('completed', 0), ('failed', 0), ('dead', 0);

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
END;
"""

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
    def __init__(self, job_id):
        super().__init__("job %r not found" % (job_id,))


class StoreError(QueueError):
    """The database could not be opened, read or written."""


###############################################################################
# Helpers #####################################################################
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
            delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            if delta >= datetime.timedelta(hours=24):
                raise bad
            tz = datetime.timezone(-delta if offset[0] == "-" else delta)
    try:
        dt = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                               int(second or 0), micro, tzinfo=tz)
        return dt.timestamp()   # naive datetimes are taken as local time
    except (OverflowError, OSError, ValueError):
        raise ValueError("time out of range: %r" % (text,))


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
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%03dZ" % ms


def format_local(ts):
    """Local time for humans: 'YYYY-MM-DD HH:MM:SS' ('-' for None)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_seconds(secs):
    if secs is None:
        return "-"
    if secs < 60:
        return "%.2fs" % secs
    if secs < 3600:
        return "%dm%02ds" % divmod(int(secs), 60)
    return "%dh%02dm" % divmod(int(secs) // 60, 60)


def default_db_path(environ=None):
    """$QUEUECTL_DB, else $XDG_DATA_HOME/queuectl/queue.db (~/.local/share/...)."""
    environ = os.environ if environ is None else environ
    if environ.get(DB_ENV):
        return environ[DB_ENV]
    data_home = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "queuectl", "queue.db")


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


_HOST = None
_BOOT_ID = None


def this_host():
    global _HOST
    if _HOST is None:
        import socket
        _HOST = socket.gethostname()
    return _HOST


def this_boot_id():
    """'<kernel boot id>/<pid namespace>' ('' parts where there are none).

    A different boot id means every worker of the old boot is dead; a
    different pid namespace (another container on the same kernel and host
    name) means its pids cannot be checked from here.
    """
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = ""
        _BOOT_ID = "%s/%s" % (boot, namespace)
    return _BOOT_ID


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


def holder_is_dead(host, boot_id, pid, start):
    """True only if the lease holder is provably dead: same host, and gone."""
    if host != this_host():
        return False
    boot, _, namespace = (boot_id or "").partition("/")
    my_boot, _, my_namespace = this_boot_id().partition("/")
    if boot and my_boot and boot != my_boot:
        return True
    if namespace != my_namespace:
        return False        # another container: its pids are not ours to check
    return not process_alive(pid, start)


def kill_job_processes(job_id, worker_id, db_path):
    """SIGKILL every process on this host left by `worker_id`'s run of job `job_id`.

    Used when a job's worker is lost: its command may still be running,
    orphaned. The processes are found by the QUEUECTL_JOB_ID, QUEUECTL_WORKER_ID
    and QUEUECTL_DB their worker put in their environment: a recorded pid
    could have been reused by now, and a new run of the same job (by another
    worker) has another worker id. Linux only; returns the count.
    """
    import signal
    marks = (b"\0QUEUECTL_JOB_ID=" + job_id.encode() + b"\0",
             b"\0QUEUECTL_WORKER_ID=" + worker_id.encode() + b"\0",
             b"\0QUEUECTL_DB=" + os.path.realpath(db_path).encode() + b"\0")
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


def printable(value):
    """Text safe for a terminal: control characters are shown escaped."""
    s = "" if value is None else str(value)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


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


def _encodable(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class Store:
    """All access to the SQLite file. Every state change is one transaction.

    `durable=True` (the CLI) commits with synchronous=FULL, so an acknowledged
    enqueue survives a power cut; workers use NORMAL: losing a worker's last
    transition to a power cut only replays a run, which at-least-once allows.
    """

    def __init__(self, path, durable=True, busy_timeout=None, create=True):
        self.path = path
        self.conn = None
        # SQLite puts the WAL beside the database file a symlink points to.
        self._wal_path = None if path == ":memory:" else os.path.realpath(path) + "-wal"
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
        if path != ":memory:" and not create and not os.path.exists(path):
            # Reading a queue that was never written: read an empty one, in
            # memory, so that `status` or `show` on a new machine leaves no file.
            path = ":memory:"
        elif path != ":memory:":
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
                # Create the file ourselves so that it is private (0600).
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as e:
                raise StoreError("cannot open database %s: %s" % (path, e.strerror or e))
        try:
            self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                        check_same_thread=False)
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
            return self.conn.execute(sql, params)

    def _all(self, sql, params=()):
        with self._errors(params):
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

    def _begin(self, wait=None):
        """BEGIN IMMEDIATE, waiting for the lock in short naps at first.

        SQLite's own busy handler sleeps 1, 2, 5, 10 ms... between tries, while
        a queuectl transaction holds the lock for a tenth of a millisecond: with
        several busy workers most of a wait would be oversleeping. So the first
        ~20 ms of waiting are ours (naps from 50 us up); then SQLite's handler
        takes over for the rest of the busy timeout (or of `wait` seconds).
        """
        conn = self.conn
        full_ms = int(self.busy_timeout * 1000)
        with self._errors():
            conn.execute("PRAGMA busy_timeout = 0")
            try:
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
            finally:
                conn.execute("PRAGMA busy_timeout = %d" % (full_ms if wait is None else int(wait * 1000)))
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                if wait is not None:
                    conn.execute("PRAGMA busy_timeout = %d" % full_ms)

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
        return not busy

    # -- config ----------------------------------------------------------------

    def config(self):
        """All configuration values, defaults filled in."""
        values = dict(CONFIG_DEFAULTS)
        for row in self._all("SELECT key, value FROM config"):
            if row["key"] in values:
                values[row["key"]] = _json_loads(row["value"])
        return values

    def set_config(self, key, value):
        with self.transaction():
            self._execute("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)",
                          (key, _json_dumps(value)))

    # -- enqueue ---------------------------------------------------------------

    def enqueue(self, jobs, now=None):
        """Insert jobs (dicts from `validate_job`); all or none. Returns their ids.

        Fields left out take the configured defaults. A user-supplied id that
        exists already is an error; a generated id that collides (two processes
        in the same millisecond drew the same counter) is drawn again.
        """
        now = time.time() if now is None else now
        for _ in range(5):
            try:
                return self._enqueue(jobs, now)
            except sqlite3.IntegrityError:
                continue
        raise QueueError("could not generate unique job ids; please retry")

    def _enqueue(self, jobs, now):
        with self.transaction():
            config = self.config()
            given = [job["id"] for job in jobs if job.get("id") is not None]
            for i in range(0, len(given), 500):
                chunk = given[i:i + 500]
                rows = self._all("SELECT id FROM jobs WHERE id IN (%s)" % ",".join("?" * len(chunk)),
                                 chunk)
                if rows:
                    raise QueueError("job %r already exists" % rows[0]["id"])
            rows = []
            for job in jobs:
                max_retries = job.get("max_retries")
                rows.append((
                    job.get("id") or new_job_id(),
                    job["command"],
                    job["cwd"],
                    job.get("priority", 0),
                    config["max_retries"] if max_retries is None else max_retries,
                    job.get("timeout", config["timeout"]),
                    job.get("run_at", now),
                    now,
                    now,
                ))
            try:
                self.conn.executemany("""
                    INSERT INTO jobs (id, command, cwd, state, priority, max_retries, timeout,
                                      run_at, created_at, updated_at)
                    VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)""", rows)
            except sqlite3.IntegrityError:
                raise       # a generated id collided: enqueue() rolls back and retries
            except sqlite3.Error as e:
                raise self._error(e)
            except UnicodeEncodeError:
                raise _not_utf8([value for row in rows for value in row])
            self._execute("UPDATE counts SET n = n + ? WHERE state = 'pending'", (len(rows),))
        return [row[0] for row in rows]

    # -- claim, heartbeat, finish ------------------------------------------------

    def stop_requested(self, worker_id):
        """Has `worker stop` asked this worker to stop? (A read; no lock.)"""
        row = self._one("SELECT stop_requested FROM workers WHERE id = ?", (worker_id,))
        return bool(row and row[0] & STOP_ASKED)

    def has_due(self, now):
        """Cheap read-only check (no lock taken): is any job due?"""
        return self._one("""
            SELECT 1 FROM jobs INDEXED BY jobs_due
            WHERE state IN ('pending', 'failed') AND run_at <= ?
            LIMIT 1""", (now,)) is not None

    def claim(self, worker_id, now=None, lease=LEASE_SECONDS):
        """Atomically take the next due job for `worker_id`, or return None.

        Inside one BEGIN IMMEDIATE transaction: pick the due job with the
        highest priority, then the earliest due time, then enqueue order (the
        walk of the partial index jobs_due; named, because the planner would
        rather use jobs_state and sort every due job); mark
        it processing under a lease; count the attempt; open its run record.
        Returns the job as a dict with the new run number under 'run'; None
        when nothing is due or the worker has been asked to stop.
        """
        now = time.time() if now is None else now
        with self.transaction():
            return self._claim(worker_id, now, lease)

    def _claim(self, worker_id, now, lease):
        """The body of claim(); the caller holds the transaction."""
        if self.stop_requested(worker_id):
            return None
        job = self._one("""
            SELECT * FROM jobs INDEXED BY jobs_due
            WHERE state IN ('pending', 'failed') AND run_at <= ?
            ORDER BY priority DESC, run_at, seq
            LIMIT 1""", (now,))
        if job is None:
            return None
        job = dict(job)
        job["attempts"] += 1
        job["run_count"] += 1
        job["run"] = job["run_count"]
        self._execute("""
            UPDATE jobs
            SET state = 'processing', attempts = ?, run_count = ?, worker_id = ?, lease_until = ?,
                updated_at = ?
            WHERE seq = ?""", (job["attempts"], job["run"], worker_id, now + lease, now, job["seq"]))
        self._execute("""
            INSERT INTO runs (job_id, run, attempt, worker_id, started_at)
            VALUES (?, ?, ?, ?, ?)""", (job["id"], job["run"], job["attempts"], worker_id, now))
        job["state"] = "processing"
        return job

    def heartbeat(self, worker_id, job_id=None, now=None, lease=LEASE_SECONDS, stopping=False):
        """Renew the worker's liveness and its job's lease, in one transaction.
        `stopping` marks the worker as stopping (e.g. after a signal).

        Returns (stop_requested, cancel_requested, lease_held).
        """
        now = time.time() if now is None else now
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
                interrupted=False):
        """Move a processing job on after a run; the caller holds the transaction.

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
        self._execute("""
            UPDATE jobs
            SET state = ?, run_at = ?, attempts = attempts - ?, exit_code = ?, outcome = ?,
                worker_id = NULL, lease_until = NULL, cancel_requested = 0, updated_at = ?
            WHERE id = ?""", (state, run_at, 1 if interrupted else 0, exit_code, outcome, now, job["id"]))
        self._execute("""
            UPDATE runs
            SET finished_at = ?, exit_code = ?, outcome = ?, result_state = ?, stdout = ?, stderr = ?
            WHERE job_id = ? AND run = ?""",
                      (now, exit_code, outcome, state, stdout, stderr, job["id"], run))
        return state, run_at

    def finish(self, job_id, run, worker_id, result, now=None, interrupted=False, claim_next=False,
               lease=LEASE_SECONDS):
        """Record a run's result and move the job on, if `worker_id` still holds it.

        Returns (state, run_at), or None when the lease was lost (the job was
        reclaimed meanwhile): then only the run's own record is completed.
        With claim_next, the worker's next job is claimed in the same
        transaction (half the commits and lock waits of a busy worker) and
        ((state, run_at) or None, next job or None) is returned.
        """
        now = time.time() if now is None else now
        with self.transaction():
            settled = self._finish(job_id, run, worker_id, result, now, interrupted)
            if not claim_next:
                return settled
            return settled, self._claim(worker_id, now, lease)

    def _finish(self, job_id, run, worker_id, result, now, interrupted):
        """The body of finish(); the caller holds the transaction."""
        job = self._one("""
            SELECT * FROM jobs WHERE id = ? AND state = 'processing' AND worker_id = ?""",
                        (job_id, worker_id))
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
                            result.stdout, result.stderr, interrupted=interrupted)

    # -- workers and reclaiming lost jobs ---------------------------------------

    def _register(self, worker_id, now):
        host, pid, start = worker_id.rsplit(":", 2)
        self._execute("""
            INSERT OR REPLACE INTO workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)""",
                      (worker_id, host, this_boot_id(), int(pid), int(start) if start != "-" else None,
                       now, now))

    def register_worker(self, worker_id, now=None):
        with self.transaction():
            self._register(worker_id, time.time() if now is None else now)

    def unregister_worker(self, worker_id):
        """Delete the worker's row; returns whether `worker stop` had asked it
        to stop (read in the same transaction, so that no request is lost)."""
        with self.transaction():
            row = self._one("SELECT stop_requested FROM workers WHERE id = ?", (worker_id,))
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

    def request_stop(self):
        """Ask every registered worker to finish its job and exit. Returns their rows."""
        with self.transaction():
            self._execute("UPDATE workers SET stop_requested = stop_requested | ?", (STOP_ASKED,))
            return self.workers()

    def forget_workers(self, worker_ids):
        with self.transaction():
            for wid in worker_ids:
                self._execute("DELETE FROM workers WHERE id = ?", (wid,))

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
        now = time.time() if now is None else now
        with self.transaction():
            job = self._one("""
                SELECT * FROM jobs
                WHERE id = ? AND state = 'processing' AND worker_id = ? AND (? OR lease_until <= ?)""",
                            (job_id, worker_id, 1 if holder_dead else 0, now))
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
            raise JobNotFound(job_id)
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
        limit = -1 if limit is None else limit
        if state is None:
            rows = self._all("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?",
                             (state, limit))
        return [dict(r) for r in reversed(rows)]

    def counts(self):
        counts = {s: 0 for s in STATES}
        for row in self._all("SELECT state, n FROM counts"):
            counts[row["state"]] = row["n"]
        return counts

    def states(self, job_ids):
        """{id: (state, exit_code)} for the given ids that exist."""
        out = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            for row in self._all("SELECT id, state, exit_code FROM jobs WHERE id IN (%s)"
                                 % ",".join("?" * len(chunk)), chunk):
                out[row["id"]] = (row["state"], row["exit_code"])
        return out

    def finished_runs(self, since):
        """(finished_at, duration, result_state, outcome) of runs that ended after `since`."""
        return self._all("""
            SELECT finished_at, finished_at - started_at, result_state, outcome
            FROM runs
            WHERE finished_at >= ?""", (since,))

    # -- changes requested by the user ------------------------------------------

    def retry_dead(self, job_ids=None, now=None):
        """Move dead jobs (the given ones, or all) back to pending, attempts 0, due now.
        All or nothing: an id that is unknown or not dead changes nothing."""
        now = time.time() if now is None else now
        with self.transaction():
            if job_ids is None:
                job_ids = [r["id"] for r in self._all("SELECT id FROM jobs WHERE state = 'dead' ORDER BY seq")]
            for job_id in job_ids:
                row = self._one("SELECT state FROM jobs WHERE id = ?", (job_id,))
                if row is None:
                    raise JobNotFound(job_id)
                if row["state"] != "dead":
                    raise QueueError("job %r is not in the DLQ (it is %s)" % (job_id, row["state"]))
                self._execute("""
                    UPDATE jobs
                    SET state = 'pending', attempts = 0, run_at = ?, exit_code = NULL, outcome = NULL,
                        cancel_requested = 0, updated_at = ?
                    WHERE id = ?""", (now, now, job_id))
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
                deleted += self._execute("DELETE FROM jobs WHERE %s" % where, params).rowcount

    def cancel(self, job_ids, now=None):
        """Cancel jobs: waiting ones go to the DLQ now, running ones are asked to
        stop (their worker kills them within a heartbeat). All or nothing.
        Returns {id: 'dead' | 'cancelling'}."""
        now = time.time() if now is None else now
        result = {}
        with self.transaction():
            for job_id in job_ids:
                row = self._one("SELECT state FROM jobs WHERE id = ?", (job_id,))
                if row is None:
                    raise JobNotFound(job_id)
                state = row["state"]
                if state in DUE_STATES:
                    self._execute("""
                        UPDATE jobs SET state = 'dead', outcome = 'cancelled', updated_at = ?
                        WHERE id = ?""", (now, job_id))
                    result[job_id] = "dead"
                elif state == "processing":
                    self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    result[job_id] = "cancelling"
                else:
                    raise QueueError("job %r cannot be cancelled: it is already %s" % (job_id, state))
        return result


###############################################################################
# Job input validation ##########################################################
###############################################################################

JOB_FIELDS = ("id", "command", "max_retries", "priority", "run_at", "delay", "timeout")
_INT64 = 2 ** 63


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("field %r must be an integer, not %s" % (name, _json_type(value)))
    if not low <= value <= high:
        raise ValueError("field %r must be between %d and %d, not %d" % (name, low, high, value))
    return value


def _json_type(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def validate_job(obj, cwd, now):
    """Check one job object from the user; return the dict Store.enqueue takes.

    Raises ValueError with a message naming the field.
    """
    if not isinstance(obj, dict):
        raise ValueError("a job must be a JSON object, not %s" % _json_type(obj))
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
            job["run_at"] = now + parse_duration(obj["delay"])
        except ValueError as e:
            raise ValueError("field 'delay': %s" % e)
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
    return job


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
    for n, line in enumerate(text.splitlines(), 1):
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
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data):
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.half:
                del self.tail[:-self.half]

    def value(self):
        if self.total <= 2 * self.half:
            return bytes(self.head + self.tail)     # nothing was dropped
        tail = self.tail[-self.half:]
        cut = self.total - len(self.head) - len(tail)
        return bytes(self.head) + b"\n[... queuectl: %d bytes cut ...]\n" % cut + bytes(tail)


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


def run_command(command, cwd=None, env=None, timeout=None, check=None,
                limit=OUTPUT_LIMIT, grace=KILL_GRACE_SECONDS):
    """Run `command` with /bin/sh -c in a new session (its own process group).

    Output is read while the command runs, so no pipe fills up, and only the
    head and tail of each stream are kept. On timeout the whole group gets
    SIGTERM, then SIGKILL after `grace` seconds. `check()` is called about
    ten times a second; if it returns a reason ('interrupted', 'cancelled',
    'lease lost') the group is killed the same way (at once for
    'interrupted'). When the shell exits, anything left in its group is killed.
    Never touches the database.
    """
    import selectors
    import signal
    import subprocess

    started = time.monotonic()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        where = " (cwd %s)" % cwd if cwd and not os.path.isdir(cwd) else ""
        return RunResult(None, "error: %s%s" % (e.strerror or e, where))
    out, err = _Capture(limit), _Capture(limit)
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
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
                    kill(signal.SIGTERM)
                    kill_at = now + grace
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
    duration = time.monotonic() - started
    out, err = out.value(), err.value()
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

    `stop_level` is raised by signal handlers (they only set it): 1 means
    finish the current job and exit, 2 means kill it, put it back and exit.
    It only ever goes up: it is two flags, each only ever set, so that a
    handler running in the middle of another's `max(level, 1)` cannot undo it.
    """

    _soft = _hard = False

    @property
    def stop_level(self):
        return 2 if self._hard else 1 if self._soft else 0

    @stop_level.setter
    def stop_level(self, level):
        if level >= 2:
            self._hard = True
        if level >= 1:
            self._soft = True

    def __init__(self, db_path, name="w1", once=False, log=_log):
        self.db_path = db_path
        self.name = name
        self.once = once
        self.log = log
        self.pause_requested = False    # Ctrl-Z, relayed by the supervisor
        self.stop_asked = False     # by `worker stop` (through the database)
        pid = os.getpid()
        start = process_start(pid)
        self.id = "%s:%d:%s" % (this_host(), pid, "-" if start is None else start)
        self.store = None
        self._base_env = None
        self._wal_retry_at, self._wal_step = 0, 0       # see _bound_wal()
        self._next_heartbeat = 0.0
        self._next_retention = 0.0
        self._parent = os.getppid()

    def run(self):
        """Work until asked to stop (or, with once, until nothing is due). Returns an exit code."""
        self.store = Store(self.db_path, durable=False)
        try:
            self.store.register_worker(self.id)
            self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
            self._next_retention = time.monotonic() + RETENTION_EVERY_SECONDS
            self.reclaim_lost()
            self.apply_retention()
            pause = 1.0
            job = None
            while self.stop_level == 0:
                try:
                    self._check_parent()
                    if self.stop_level:
                        break
                    if job is None:
                        job = self.store.claim(self.id)
                        if job is not None and self.stop_level:
                            continue    # a stop came during the claim: given back below
                    if job is not None:
                        # process() records the result and claims the next
                        # job in the same transaction.
                        current, job = job, None
                        job = self.process(current)
                    elif self._stop_requested():
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
                    while self.stop_level == 0 and time.monotonic() < end:
                        time.sleep(0.05)
                    pause = min(pause * 2, 30.0)
            if job is not None:
                # Claimed with the last result, then told to stop before it
                # started: give it back, attempt and all.
                self.store.finish(job["id"], job["run"], self.id, RunResult(None, "interrupted"),
                                  interrupted=True)
                self.log("%s %s not started, back to pending" % (self.name, job["id"]))
            return EXIT_INTERRUPTED if self.stop_level >= 2 else EXIT_OK
        finally:
            try:
                # Stopping for another reason, `worker stop` may have asked too:
                # then the supervisor must not replace this worker.
                if self.store.unregister_worker(self.id):
                    self.stop_asked = True
            finally:
                self.store.close()

    def housekeeping(self, job_id=None):
        """Heartbeat (and every few beats, reclaim lost jobs) when due. Returns
        (cancel_requested, lease_held) for the current job."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return False, True
        self._next_heartbeat = now + HEARTBEAT_SECONDS
        try:
            stop, cancel, held = self.store.heartbeat(self.id, job_id, stopping=self.stop_level > 0)
        except StoreError as e:
            # The lease has LEASE_SECONDS to run; a missed beat is not a loss.
            self.log("%s heartbeat failed (%s); will retry" % (self.name, e))
            return False, True
        if stop and self.stop_level == 0:
            self.log("%s stop requested" % self.name)
            self.stop_level = 1
            self.stop_asked = True
        self._check_parent()
        if job_id is None:
            self.reclaim_lost()
            if now >= self._next_retention:
                self._next_retention = now + RETENTION_EVERY_SECONDS
                self.apply_retention()
        return cancel, held

    def apply_retention(self):
        """Delete completed jobs older than the `retention` setting (never dead ones)."""
        retention = self.store.config()["retention"]
        if retention is not None:
            n = self.store.purge(["completed"], time.time() - retention)
            if n:
                self.log("%s retention: deleted %d completed job%s" % (self.name, n, "" if n == 1 else "s"))

    def _check_parent(self):
        """If our supervisor was killed, finish the job at hand, then go too."""
        if self.stop_level == 0 and os.getppid() != self._parent:
            self.log("%s supervisor gone; stopping" % self.name)
            self.stop_level = 1

    def _stop_requested(self):
        if self.stop_level == 0 and self.store.stop_requested(self.id):
            self.log("%s stop requested" % self.name)
            self.stop_level = 1
            self.stop_asked = True
        return self.stop_level > 0

    def idle(self):
        """Wait until a job is due or we are asked to stop. Only reads: the
        data_version counter every IDLE_POLL_SECONDS (it changes when another
        connection commits) and the due check when it changed, or every
        IDLE_CLAIM_SECONDS (for jobs whose run_at simply passes)."""
        version = self.store.data_version()
        # A job enqueued after our last claim but before the counter was read
        # changes nothing we would see: look once now.
        if self.store.has_due(time.time()):
            return
        recheck = time.monotonic() + IDLE_CLAIM_SECONDS
        nap, longest = IDLE_POLL_SECONDS
        while self.stop_level == 0:
            time.sleep(nap)
            self.maybe_pause()
            nap = min(nap * 1.25, longest)
            now = time.monotonic()
            current = self.store.data_version()
            changed, version = current != version, current    # read once: no commit slips between
            if changed or now >= recheck:
                if self._stop_requested():
                    return
                if self.store.has_due(time.time()):
                    return
                recheck = now + IDLE_CLAIM_SECONDS
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
        workers that are dead or have not been heard of for a long time."""
        now = time.time()
        gone = set()
        for w in self.store.workers():
            if w["id"] == self.id:
                continue
            if holder_is_dead(w["host"], w["boot_id"], w["pid"], w["pid_start"]) or \
                    now - w["heartbeat_at"] > FORGET_WORKER_SECONDS:
                gone.add(w["id"])
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
                    kill_job_processes(lease["id"], lease["worker_id"], self.db_path)
            result = self.store.reclaim(lease["id"], lease["worker_id"], lease["run"], dead, now, before=kill)
            if result is not None:
                self.log("%s %s worker lost (%s)%s" % (
                    self.name, lease["id"], lease["worker_id"], self._next_step(result)))
        if gone:
            self.store.forget_workers(gone)

    def _check(self, job):
        """Called by the runner while the command runs: stop, cancel or carry on."""
        self.maybe_pause()
        if self.stop_level >= 2:
            return "interrupted"
        cancel, held = self.housekeeping(job["id"])
        if not held:
            return "lease lost"
        if cancel:
            return "cancelled"
        return None

    def _environ(self, job):
        """The job's environment: ours, plus the names of this run, by which
        its processes can be found after a lost lease. (Setting them in
        os.environ instead would save ~30 us a job, but glibc never frees a
        replaced variable: a worker would grow by ~80 bytes a job.)"""
        if self._base_env is None:
            self._base_env = dict(os.environ)
            self._base_env["QUEUECTL_DB"] = os.path.realpath(self.db_path)
            self._base_env["QUEUECTL_WORKER_ID"] = self.id
        env = dict(self._base_env)
        env["QUEUECTL_JOB_ID"] = job["id"]
        env["QUEUECTL_ATTEMPT"] = str(job["attempts"])
        return env

    def process(self, job):
        """Run a claimed job and record the result; returns the next job,
        claimed in the same transaction, or None."""
        self.log("%s %s claimed (attempt %d/%d): %s" % (
            self.name, job["id"], job["attempts"], job["max_retries"] + 1, job["command"]))

        result = run_command(job["command"], cwd=job["cwd"], env=self._environ(job),
                             timeout=job["timeout"],
                             check=lambda: self._check(job))
        interrupted = result.outcome == "interrupted"
        if result.exit_code is None and result.outcome in ("timeout", "cancelled", "interrupted", "lease lost"):
            # Killing the process group misses what left it (setsid, daemons);
            # their environment still names this run.
            kill_job_processes(job["id"], self.id, self.db_path)
        settled, next_job = self._finish(job, result, interrupted)
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

    def _finish(self, job, result, interrupted):
        """Record the result; if the database is unwritable for a while (disk
        full, a lock held too long), keep trying for about a lease, so that
        the run is not lost to a passing problem. After that the job will be
        reclaimed as 'worker lost' and run again. Returns (settled, next job)."""
        give_up = time.monotonic() + LEASE_SECONDS
        while True:
            if self.stop_level >= 2:
                # A hard stop still records the result (it gives the attempt
                # back), but waits for the database only a few more seconds.
                give_up = min(give_up, time.monotonic() + 5.0)
            self._check_parent()
            claim_next = self.stop_level == 0
            try:
                done = self.store.finish(job["id"], job["run"], self.id, result, interrupted=interrupted,
                                         claim_next=claim_next)
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


###############################################################################
# Supervisor ##################################################################
###############################################################################

def _worker_main(db_path, name, once):
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
        # write, so that jobs do not inherit it.
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            _log(message)
        finally:
            signal.signal(signal.SIGTTOU, old)

    worker = Worker(db_path, name=name, once=once, log=log)
    told = {"supervisor": False, "term": False}

    def graceful(signum, frame):
        told["supervisor"] = True
        worker.stop_level = max(worker.stop_level, 1)

    def hard(signum, frame):
        told["supervisor"] = True
        worker.stop_level = 2

    def term(signum, frame):
        told["term"] = True
        worker.stop_level = min(worker.stop_level + 1, 2)

    def pause(signum, frame):
        worker.pause_requested = True

    def ignore(signum, frame):
        pass

    # A handler, not SIG_IGN: an ignored signal stays ignored across exec, and
    # the jobs must get SIGINT's default action.
    signal.signal(signal.SIGINT, ignore)
    signal.signal(signal.SIGUSR1, graceful)
    signal.signal(signal.SIGUSR2, hard)
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGHUP, term)      # only ever sent to this worker alone
    signal.signal(signal.SIGTSTP, pause)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)   # not the supervisor's relay
    try:
        code = worker.run()
    except QueueError as e:
        log("%s error: %s" % (name, e))
        code = EXIT_ERROR
    if code in (EXIT_OK, EXIT_INTERRUPTED) and told["term"] and not told["supervisor"] \
            and not worker.stop_asked:
        code = EXIT_WORKER_TERMINATED
    sys.stdout.flush()
    os._exit(code)


class Supervisor:
    """Runs N worker processes in the foreground and restarts those that die.

    First SIGINT/SIGTERM: stop claiming, let running jobs finish, exit 0.
    Second: kill running jobs, put them back to pending, exit 130. With
    `once`, workers exit when nothing is due and the supervisor follows.
    """

    def __init__(self, db_path, count=1, once=False, log=_log):
        self.db_path = db_path
        self.count = count
        self.once = once
        self.log = log
        self.stop_level = 0
        self.failed = False     # a --once worker failed
        self.workers = {}       # name -> Process

    def _start(self, ctx, name):
        proc = ctx.Process(target=_worker_main, args=(self.db_path, name, self.once), name=name)
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
        import multiprocessing
        import multiprocessing.connection
        import signal

        # fork: a worker is the supervisor's child (parent-death checks, signals
        # and the pool's session rely on it), whatever the platform's default.
        ctx = multiprocessing.get_context("fork")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signalled = []

        def on_signal(signum, frame):
            signalled.append(signum)

        def on_tstp(signum, frame):
            # Ctrl-Z reaches us alone (workers have groups of their own):
            # workers pause themselves where they hold no lock (within 0.1 s),
            # then we stop. Their jobs run on, as they always did.
            self._signal_workers(signal.SIGTSTP)
            os.kill(os.getpid(), signal.SIGSTOP)

        def on_cont(signum, frame):
            self._signal_workers(signal.SIGCONT)

        stops = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            stops.append(signal.SIGHUP)     # the terminal went away (unless under nohup)
        old = {s: signal.signal(s, on_signal) for s in stops}
        old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, on_tstp)
        old[signal.SIGCONT] = signal.signal(signal.SIGCONT, on_cont)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        restarts = {}           # name -> quick deaths in a row
        due = {}                # name -> when to restart it
        try:
            for i in range(self.count):
                self._start(ctx, "w%d" % (i + 1))
            self.log("started %d worker%s on %s%s" % (
                self.count, "" if self.count == 1 else "s", self.db_path, " (once)" if self.once else ""))
            while self.workers or due:
                timeout = 1.0
                if due:
                    timeout = max(0.0, min(timeout, min(due.values()) - time.monotonic()))
                sentinels = [p.sentinel for p in self.workers.values()]
                multiprocessing.connection.wait(sentinels + [wake_r], timeout=timeout)
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                while signalled:
                    if signalled.pop() == signal.SIGHUP and self.stop_level:
                        continue    # a closing terminal may send two: never a hard stop
                    self.stop_level = min(self.stop_level + 1, 2)
                    if self.stop_level == 1:
                        self.log("stopping: waiting for running jobs to finish (signal again to kill them)")
                        self._signal_workers(signal.SIGUSR1)
                    else:
                        self.log("stopping now: killing running jobs and putting them back")
                        self._signal_workers(signal.SIGUSR2)
                    due.clear()
                for name, when in list(due.items()):
                    if time.monotonic() >= when:
                        del due[name]
                        self._start(ctx, name)
                for name, proc in list(self.workers.items()):
                    if proc.is_alive():
                        continue
                    proc.join()
                    del self.workers[name]
                    code = proc.exitcode
                    quick = time.monotonic() - proc.started_at < 1.0
                    restarts[name] = restarts.get(name, 0) + 1 if quick else 0
                    delay = min(2 ** restarts[name], 30) if quick else 0
                    if code == EXIT_WORKER_TERMINATED and not self.stop_level:
                        if self.once:
                            self.log("%s (pid %d) stopped by SIGTERM" % (name, proc.pid))
                        else:
                            self.log("%s (pid %d) stopped by SIGTERM; starting another%s" % (
                                name, proc.pid, " in %ds" % delay if delay else ""))
                            due[name] = time.monotonic() + delay
                        continue
                    if code in (EXIT_OK, EXIT_INTERRUPTED) or self.stop_level:
                        if code == EXIT_OK and not self.once and not self.stop_level:
                            # A worker leaves on its own only when `worker stop` asked.
                            self.stop_level = 1
                            self._signal_workers(signal.SIGUSR1)
                            due.clear()
                        continue
                    how = "signal %d" % -code if code < 0 else "exit code %d" % code
                    if self.once and code > 0:
                        # From cron: report and let the next run try again,
                        # rather than pile up supervisors that retry forever.
                        self.log("%s (pid %d) failed (%s); not restarted with --once" % (name, proc.pid, how))
                        self.failed = True
                        continue
                    self.log("%s (pid %d) died (%s); restarting%s" % (
                        name, proc.pid, how, " in %ds" % delay if delay else ""))
                    # Restarted by the loop, which keeps answering signals meanwhile.
                    due[name] = time.monotonic() + delay
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in old.items():
                signal.signal(s, handler)
            os.close(wake_r)
            os.close(wake_w)
        self.log("all workers stopped")
        if self.stop_level >= 2:
            return EXIT_INTERRUPTED
        return EXIT_ERROR if self.failed else EXIT_OK


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


def print_json(value):
    import json
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


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


###############################################################################
# CLI #########################################################################
###############################################################################

EPILOG = """\
environment:
  QUEUECTL_DB                 database file (default: $XDG_DATA_HOME/queuectl/queue.db,
                              i.e. ~/.local/share/queuectl/queue.db)
  QUEUECTL_BUSY_TIMEOUT       how long to wait for another process's lock (default 30s)
  QUEUECTL_ALLOW_NETWORK_FS   set to 1 to allow a database on NFS/SMB (one host only)

exit codes: 0 ok, 1 error, 2 usage error, 124 timed out (wait, worker stop),
130 interrupted; `wait` exits with the failed job's exit code.
"""


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors become one line (UsageError), not usage text + exit."""

        def error(self, message):
            where = self.prog.partition(" ")[2]
            raise UsageError("%s%s (see '%s --help')" % (where + ": " if where else "", message, self.prog))

    return argparse, Parser


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


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise _argtype_error("invalid integer %r" % text)
    if value < 1:
        raise _argtype_error("must be at least 1, not %d" % value)
    return value


def _nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        raise _argtype_error("invalid integer %r" % text)
    if value < 0:
        raise _argtype_error("must not be negative")
    return value


def _duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise _argtype_error(str(e))


def _argtype_error(message):
    import argparse
    return argparse.ArgumentTypeError(message)


class _Skipped:
    """Stands in for the parsers of commands not being run (see build_parser)."""

    def __getattr__(self, name):
        return lambda *args, **kw: self


_SKIPPED = _Skipped()
COMMANDS = ("enqueue", "worker", "status", "list", "show", "logs", "wait", "cancel", "dlq", "config",
            "stats", "purge")


def _command_word(argv):
    """The command named in argv (skipping global options), or None."""
    args = iter(argv)
    for arg in args:
        if arg == "--db":
            next(args, None)
        elif arg == "--" or not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only=None):
    """The argument parser; with `only`, just that command's part of it (the
    other commands' parsers cost start-up time and are not needed to parse)."""
    argparse, Parser = _parser_class()
    width = _help_width()

    def formatter(prog):
        return argparse.RawDescriptionHelpFormatter(prog, width=width)

    common = Parser(add_help=False, formatter_class=formatter)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="database file (default: $QUEUECTL_DB or ~/.local/share/queuectl/queue.db)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    json_opt = Parser(add_help=False, formatter_class=formatter)
    json_opt.add_argument("--json", action="store_true", help="print JSON")

    parser = Parser(prog="queuectl", description="A background job queue for shell commands, on SQLite.",
                    epilog=EPILOG, formatter_class=formatter,
                    parents=[common])
    parser.add_argument("--version", action="version", version="queuectl " + __version__)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    def add(subparsers, name, func, help, parents=(), **kw):
        if subparsers is _SKIPPED or (subparsers is sub and only not in (None, name)):
            return _SKIPPED
        p = subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  parents=[common] + list(parents), epilog=EPILOG,
                                  formatter_class=formatter, **kw)
        p.set_defaults(func=func)
        return p

    p = add(sub, "enqueue", cmd_enqueue, "add jobs: a JSON object, --file, or a command after --",
            usage="queuectl enqueue [options] ('{\"command\": ...}' | --file PATH | -- COMMAND...)")
    p.add_argument("job", nargs="*", metavar="JSON | COMMAND",
                   help="a JSON job object, or (after --) the command to run")
    p.add_argument("-f", "--file", metavar="PATH",
                   help="read jobs from a file ('-' = stdin): a JSON object, array or JSON Lines")
    p.add_argument("--id", help="the job's id (default: generated)")
    p.add_argument("-p", "--priority", type=int, help="higher runs first (default 0)")
    p.add_argument("-r", "--max-retries", type=_nonneg_int, metavar="N",
                   help="retries after the first run (default: config max_retries)")
    p.add_argument("-t", "--timeout", type=_duration_arg, metavar="DURATION",
                   help="kill the job after this long (e.g. 60, 10m; default: config timeout)")
    p.add_argument("--delay", type=_duration_arg, metavar="DURATION", help="run no earlier than this from now")
    p.add_argument("--run-at", metavar="TIME", help="run no earlier than this ISO-8601 time (local if no offset)")

    p = add(sub, "worker", None, "start or stop workers")
    wsub = p.add_subparsers(dest="worker_cmd", metavar="ACTION")
    wsub.required = True
    w = add(wsub, "start", cmd_worker_start, "run workers in the foreground")
    w.add_argument("-c", "--count", type=_positive_int, default=1, metavar="N",
                   help="number of worker processes (default 1)")
    w.add_argument("--once", action="store_true",
                   help="process every job that is due now, then exit (for cron)")
    w = add(wsub, "stop", cmd_worker_stop, "ask running workers to finish their jobs and exit")
    w.add_argument("--timeout", type=_duration_arg, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: wait until they have stopped)")

    add(sub, "status", cmd_status, "job counts per state and the active workers", parents=[json_opt])

    p = add(sub, "list", cmd_list, "list jobs, most recent last", parents=[json_opt])
    p.add_argument("-s", "--state", help="only jobs in this state (%s)" % ", ".join(STATES))
    p.add_argument("-n", "--limit", type=_nonneg_int, default=100, metavar="N",
                   help="show the N most recent (default 100; 0 = all)")

    p = add(sub, "show", cmd_show, "every field of a job and its run history", parents=[json_opt])
    p.add_argument("id")

    p = add(sub, "logs", cmd_logs, "captured stdout (to stdout) and stderr (to stderr) of a run")
    p.add_argument("id")
    p.add_argument("-a", "--attempt", type=_positive_int, metavar="N",
                   help="the Nth run as numbered by 'show' (default: the last)")

    p = add(sub, "wait", cmd_wait, "wait until jobs are completed or dead; exit with the failure's code")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_duration_arg, default=None, metavar="DURATION",
                   help="give up after this long (exit 124)")

    p = add(sub, "cancel", cmd_cancel, "cancel jobs: waiting ones go to the DLQ, running ones are killed")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = add(sub, "dlq", None, "the dead letter queue: list or retry dead jobs")
    dsub = p.add_subparsers(dest="dlq_cmd", metavar="ACTION")
    dsub.required = True
    add(dsub, "list", cmd_dlq_list, "list dead jobs", parents=[json_opt])
    d = add(dsub, "retry", cmd_dlq_retry, "move dead jobs back to pending (attempts reset, due now)")
    d.add_argument("ids", nargs="*", metavar="ID")
    d.add_argument("--all", action="store_true", help="retry every dead job")

    p = add(sub, "config", None, "get or set configuration (stored in the database)")
    csub = p.add_subparsers(dest="config_cmd", metavar="ACTION")
    csub.required = True
    c = add(csub, "set", cmd_config_set, "set a configuration value")
    c.add_argument("key")
    c.add_argument("value")
    c = add(csub, "get", cmd_config_get, "print a configuration value")
    c.add_argument("key")
    add(csub, "list", cmd_config_list, "print every configuration value", parents=[json_opt])

    add(sub, "stats", cmd_stats, "what happened over the last hour and day", parents=[json_opt])

    p = add(sub, "purge", cmd_purge, "delete finished jobs and their logs (completed by default)")
    p.add_argument("--older-than", type=_duration_arg, default=0.0, metavar="DURATION",
                   help="only jobs finished at least this long ago (e.g. 7d; default: all)")
    p.add_argument("-s", "--state", action="append", choices=("completed", "dead"),
                   help="completed (default) or dead; repeat for both. The DLQ is only purged when named")
    return parser


def _open_store(args, create=False):
    """The store named by --db / $QUEUECTL_DB / the default path. Only commands
    that write jobs or settings create the file; the others read an empty
    queue where there is none."""
    return Store(getattr(args, "db", None) or default_db_path(), create=create)


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
    flags = {}
    for name in ("id", "priority", "max_retries", "timeout", "delay", "run_at"):
        value = getattr(args, name)
        if value is not None:
            flags[name] = value
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
            raise UsageError("expected one JSON job object (to enqueue a command, put it after --: "
                             "queuectl enqueue -- COMMAND)")
        where_objs = _parse_or_fail(args.job[0], hint=True)
    jobs = []
    for where, obj in where_objs:
        if isinstance(obj, dict) and flags:
            defaults = dict(flags)
            if "run_at" in obj or "delay" in obj:
                # The job's own time wins over a flag's, whichever form each has.
                defaults.pop("run_at", None)
                defaults.pop("delay", None)
            obj = dict(defaults, **obj)     # flags are defaults for fields the JSON leaves out
        try:
            jobs.append(validate_job(obj, cwd, now))
        except ValueError as e:
            raise QueueError("%s%s" % (where, e))
    if len(jobs) > 1 and "id" in flags:
        raise UsageError("--id cannot be used with several jobs")
    given = [job["id"] for job in jobs if "id" in job]
    if len(set(given)) != len(given):
        seen = set()
        raise QueueError("job %r appears twice in the input" % next(i for i in given if i in seen or seen.add(i)))
    with _open_store(args, create=True) as store:
        ids = store.enqueue(jobs, now=now)
    sys.stdout.write("".join(i + "\n" for i in ids))
    return EXIT_OK


def _shlex_join(words):
    import shlex
    return " ".join(shlex.quote(w) for w in words)


def _parse_or_fail(text, hint=False):
    try:
        return parse_jobs_text(text)
    except ValueError as e:
        if hint and not text.lstrip().startswith(("{", "[")):
            raise QueueError("%s (to enqueue a command, put it after --: queuectl enqueue -- COMMAND)" % e)
        raise QueueError(str(e))
    except RecursionError:
        raise QueueError("invalid JSON: nested too deeply")


def cmd_worker_start(args):
    db_path = getattr(args, "db", None) or default_db_path()
    # Open once here so that a bad path or a newer schema is one clear error,
    # before any process starts; the connection is closed before forking.
    Store(db_path).close()
    return Supervisor(db_path, count=args.count, once=args.once).run()


def cmd_worker_stop(args):
    with _open_store(args) as store:
        targets = store.request_stop()
        gone = [w["id"] for w in targets
                if holder_is_dead(w["host"], w["boot_id"], w["pid"], w["pid_start"])]
        if gone:
            store.forget_workers(gone)
        waiting = {w["id"]: w for w in targets if w["id"] not in gone}
        if not waiting:
            _err("no workers running")
            return EXIT_OK
        _err("asked %d worker%s to stop; waiting for running jobs to finish"
             % (len(waiting), "" if len(waiting) == 1 else "s"))
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            alive = {w["id"] for w in store.workers()}
            remaining = [w for wid, w in waiting.items() if wid in alive]
            if not remaining:
                _err("stopped %d worker%s" % (len(waiting), "" if len(waiting) == 1 else "s"))
                return EXIT_OK
            if deadline is not None and time.monotonic() >= deadline:
                _err("timed out: %d worker%s still running (pid %s)" % (
                    len(remaining), "" if len(remaining) == 1 else "s",
                    ", ".join(str(w["pid"]) for w in remaining)))
                return EXIT_TIMEOUT
            time.sleep(0.1)


def _err(message):
    sys.stderr.write("queuectl: %s\n" % message)


def cmd_status(args):
    with _open_store(args) as store:
        counts = store.counts()
        workers = store.workers()
    now = time.time()
    for w in workers:
        w["alive"] = not holder_is_dead(w["host"], w["boot_id"], w["pid"], w["pid_start"]) and \
            now - w["heartbeat_at"] < LEASE_SECONDS
    if args.json:
        print_json({
            "counts": counts,
            "workers": [{"id": w["id"], "host": w["host"], "pid": w["pid"],
                         "started_at": format_time(w["started_at"]),
                         "heartbeat_at": format_time(w["heartbeat_at"]),
                         "job": w["job_id"], "alive": w["alive"],
                         "stopping": bool(w["stop_requested"])} for w in workers],
        })
        return EXIT_OK
    print_table(("STATE", "JOBS"), [(s, counts[s]) for s in STATES])
    sys.stdout.write("\n")
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


def _print_jobs(jobs, as_json, dlq=False):
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
    rows = []
    for j in jobs:
        when = j["run_at"] if j["state"] in DUE_STATES else j["updated_at"]
        rows.append((j["id"], j["state"], _attempts(j), j["priority"], format_local(when),
                     "-" if j["exit_code"] is None else j["exit_code"], j["command"]))
    print_table(("ID", "STATE", "ATTEMPTS", "PRI", "RUN AT / UPDATED", "EXIT", "COMMAND"), rows)


def cmd_list(args):
    _check_state(args.state)
    with _open_store(args) as store:
        jobs = store.list_jobs(args.state, args.limit or None)
    _print_jobs(jobs, args.json)
    return EXIT_OK


def cmd_show(args):
    with _open_store(args) as store:
        job = store.get(args.id)
        runs = store.runs(args.id)
    data = job_to_json(job)
    data["runs"] = [run_to_json(r) for r in runs]
    if args.json:
        print_json(data)
        return EXIT_OK
    fields = [("id", job["id"]), ("command", job["command"]), ("state", job["state"]),
              ("attempts", _attempts(job)), ("priority", job["priority"]),
              ("run at", format_local(job["run_at"])),
              ("timeout", "-" if job["timeout"] is None else format_seconds(job["timeout"])),
              ("created", format_local(job["created_at"])), ("updated", format_local(job["updated_at"])),
              ("exit code", "-" if job["exit_code"] is None else job["exit_code"]),
              ("outcome", job["outcome"] or "-"), ("cwd", job["cwd"])]
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


def cmd_logs(args):
    with _open_store(args) as store:
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


def cmd_wait(args):
    ids = list(dict.fromkeys(args.ids))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with _open_store(args) as store:
        states = store.states(ids)
        for job_id in ids:
            if job_id not in states:
                raise JobNotFound(job_id)
        delay = 0.05
        while True:
            pending = [i for i in ids if states[i][0] not in ("completed", "dead")]
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                _err("timed out waiting for %d job%s: %s" % (
                    len(pending), "" if len(pending) == 1 else "s", " ".join(pending)))
                return EXIT_TIMEOUT
            version = store.data_version()
            end = time.monotonic() + delay
            while time.monotonic() < end and store.data_version() == version:
                time.sleep(0.01)
            delay = min(delay * 1.5, 1.0)
            states.update(store.states(pending))
    code = EXIT_OK
    for job_id in ids:
        state, exit_code = states[job_id]
        if state == "dead":
            _err("job %s is dead (%s)" % (job_id, "exit %d" % exit_code if exit_code is not None
                                          else "no exit code"))
            if code == EXIT_OK:
                code = exit_code if exit_code else EXIT_ERROR
    return code


def cmd_cancel(args):
    with _open_store(args) as store:
        result = store.cancel(list(dict.fromkeys(args.ids)))
    for job_id, what in result.items():
        _err("job %s %s" % (job_id, "cancelled (moved to DLQ)" if what == "dead"
                            else "is running: its worker will kill it and move it to the DLQ"))
    return EXIT_OK


def cmd_dlq_list(args):
    with _open_store(args) as store:
        jobs = store.list_jobs("dead")
    _print_jobs(jobs, args.json, dlq=True)
    return EXIT_OK


def cmd_dlq_retry(args):
    if args.all == bool(args.ids):
        raise UsageError("give job ids or --all, not both or neither")
    with _open_store(args) as store:
        ids = store.retry_dead(None if args.all else list(dict.fromkeys(args.ids)))
    _err("%d job%s moved back to pending" % (len(ids), "" if len(ids) == 1 else "s"))
    return EXIT_OK


def _config_key(key):
    k = key.replace("-", "_")
    if k not in CONFIG_DEFAULTS:
        raise QueueError("unknown config key %r (valid: %s)" % (key, ", ".join(CONFIG_DEFAULTS)))
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
        if key in ("timeout", "retention"):
            if text.strip().lower() in ("none", "null", "0", ""):
                return None
            return parse_duration(text)
        return parse_duration(text)
    except ValueError:
        raise QueueError("invalid value %r for %s: expected %s" % (text, key, CONFIG_HELP[key]))


def _config_text(value):
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def cmd_config_set(args):
    key = _config_key(args.key)
    value = parse_config_value(key, args.value)
    with _open_store(args, create=True) as store:
        store.set_config(key, value)
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
                    [(k, _config_text(v), CONFIG_HELP[k]) for k, v in config.items()])
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
    now = time.time()
    with _open_store(args) as store:
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
        n = store.purge(states, time.time() - args.older_than)
    _err("purged %d %s job%s" % (n, " and ".join(states), "" if n == 1 else "s"))
    return EXIT_OK


def main(argv=None):
    """Run the command line; returns the exit code (never raises for user errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        parser = build_parser(only=_command_word(argv))
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


if __name__ == "__main__":
    sys.exit(main())
