"""Tests for queuectl.py: the command-line contract, the store, real workers, reliability under
chaos, the SQLite file itself, and the dashboard.

Run from the repository root:

    python3 -m unittest -v test_queuectl
    python3 -m unittest -v test_queuectl.TestShutdown      # one area

Standard library only (it also runs under pytest). Linux only: processes are found through /proc.

The scaffold (use it for every new test):

- ``QueueTestCase`` is the one base class. Each test gets a private temp dir (``self.tmp``, also
  the cwd), a private environment, and a fresh database location ``self.db`` from ``new_db()``.
  Every process a test starts carries the test's tag (``self.env()``) and is SIGKILLed when the
  test ends, pass or fail.
- The CLI in-process: ``run_cli``/``run_cli_bytes`` -> (code, out, err); ``expect_success`` and
  ``expect_failure`` assert the contract (exit code, one stderr line, database unchanged).
  Shortcuts on top: ``add``, ``job``, ``jobs``, ``dlq_ids``, ``init_db``.
- The CLI as a real process: ``cli_argv`` builds ``python queuectl.py --db DB ARGS``; ``spawn``
  starts it in the background; ``script`` runs it to the end -> (code, out bytes, err bytes);
  ``script_text`` decodes and by default asserts exit 0; ``run_once`` is ``worker start --once``;
  ``start_pool``/``wait_pool``/``stop_pool``/``pool_log`` run ``worker start`` in the background.
- Waiting: ``self.wait_until(predicate, timeout, message)`` and ``wait_state``. Every wait has a
  deadline; nothing sleeps "long enough".
- The database directly: ``db_dump`` (everything, for "nothing changed"), ``query`` and
  ``query_one`` (read-only SQL), ``open_store`` (a ``queuectl.Store`` closed at cleanup),
  ``connect`` (a raw connection). ``self.db`` is passed to queuectl only through these helpers and
  the CLI helpers above, so one override of ``new_db`` (and ``connect``) can run the same tests
  against another backend.

Backends. Every ``QueueTestCase`` class is a behaviour test that must hold on every backend
(today SQLite; PostgreSQL next: ``new_db`` returning ``QUEUECTL_TEST_PG_DSN`` with a schema of
its own per test through ``options=-csearch_path=...``), unless the class or the test method is
decorated ``@sqlite_only`` (``is_sqlite_only()`` tells): tests of the SQLite file itself (file
permissions and locations, WAL, locks held by other SQLite processes, migrations of old files,
SQLite builds). A behaviour test reaches the database only through the helpers above, never
through ``sqlite3`` or a file path of its own; plain ``unittest.TestCase`` classes touch no
database at all.
"""

import argparse
import datetime
import io
import json
import os
import py_compile
import random
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.error
import urllib.parse
import urllib.request
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUECTL = os.path.join(HERE, "queuectl.py")
LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import queuectl  # noqa: E402

#: Written by queuectl at schema 1.
FIXTURE_V1 = os.path.join(HERE, "test_fixtures", "schema-v1.db")
#: Written by queuectl at schema 2 (commit c792427): done-1 completed, dead-1 dead, backoff-1
#: failed with its retry due in 2100 (priority 10), retry-1 failed and due (priority 1), due-1
#: pending and due, sched-1 pending for 2100 (priority 10).
FIXTURE_V2 = os.path.join(HERE, "test_fixtures", "schema-v2.db")
#: The five states, in the contract's order.
STATES = ("pending", "processing", "completed", "failed", "dead")
#: Fields the contract documents for a job in --json output.
JOB_JSON_FIELDS = ("id", "command", "state", "attempts", "max_retries", "priority", "run_at",
                   "timeout", "created_at", "updated_at", "exit_code")
#: Every command and subcommand the contract names.
CONTRACT_COMMANDS = (("enqueue",), ("worker", "start"), ("worker", "stop"), ("status",), ("list",),
                     ("show",), ("logs",), ("wait",), ("dlq", "list"), ("dlq", "retry"),
                     ("config", "set"), ("config", "get"), ("config", "list"), ("stats",))
#: Seconds any single wait may take before the test fails (generous: the machine may be busy).
DEADLINE = 30.0
#: Seconds a whole queuectl process may take (it may wait on locks and other processes).
SCRIPT_DEADLINE = 60.0
#: ISO-8601 UTC, as --json prints times.
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
#: Environment variable that marks every process a test starts (pools, workers, their jobs).
TAG_ENV = "QUEUECTL_TEST_TAG"


###############################################################################
# Helpers: time, the parser, fixtures, other users ############################
###############################################################################

def iso_to_ts(text):
    """Epoch seconds from the ISO-8601 UTC strings that --json prints."""
    if not ISO_UTC.match(text or ""):
        raise AssertionError("not an ISO-8601 UTC time ending in Z: %r" % (text,))
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    dt = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def command_paths():
    """Every command and subcommand of the real parser, e.g. ['dlq', 'retry']."""
    paths = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append(prefix + [name])
                    walk(sub, prefix + [name])

    walk(queuectl.build_parser(), [])
    return paths


def copy_fixture(path, fixture=FIXTURE_V1):
    """Copy a database that an older queuectl wrote (schema v1 by default) to `path`.

    Its jobs were enqueued in directories (/tmp/v1) that exist only on the machine
    that made it; the copy's jobs run in a directory beside `path` instead, so the
    test depends on nothing outside its own temp dir. Raw sqlite3, so the copy
    keeps its old schema version for the migration under test."""
    shutil.copy(fixture, path)
    os.chmod(path, 0o600)
    cwd = os.path.join(os.path.dirname(path), "v1-cwd")
    os.makedirs(cwd, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE jobs SET cwd = ?", (cwd,))
    finally:
        conn.close()


def skip_or_fail(test, reason):
    """Skip with `reason`, except under CI (CI=true), where a case that cannot
    run must fail rather than pass unnoticed."""
    if os.environ.get("CI") == "true":
        test.fail("cannot run under CI: %s" % reason)
    test.skipTest(reason)


def python_for_uid(test, uid):
    """A Python interpreter that user `uid` may run (ours may live in root's home),
    run through setpriv; skips (fails under CI) unless we are root with setpriv."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        skip_or_fail(test, "two-user cases need root and setpriv (they run queuectl as other uids)")
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        argv = as_uid(uid) + [python, "-c", "import sqlite3"]
        if os.path.exists(python) and subprocess.run(argv, stderr=subprocess.DEVNULL).returncode == 0:
            return python
    skip_or_fail(test, "no Python interpreter that uid %d may run" % uid)


def as_uid(uid):
    """argv prefix that runs a command as user and group `uid`, without supplementary groups.
    Without LD_PRELOAD: the old SQLite that .ci/run preloads lives in root's home, which
    another uid cannot read (ld.so would say so on stderr)."""
    return ["env", "-u", "LD_PRELOAD", "setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups"]


def mount_tmpfs(test, size="256k"):
    """A small tmpfs of our own in the test's temp dir (root only); unmounted at cleanup."""
    if os.geteuid() != 0:
        test.skipTest("mounting a tmpfs needs root")
    mnt = os.path.join(test.tmp, "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        test.skipTest("cannot mount a tmpfs here: %s" % r.stdout.decode(errors="replace").strip())
    test.addCleanup(subprocess.run, ["umount", "-l", mnt])
    return mnt


def file_state(path):
    """Bytes and mtime of a file and which of its -wal/-shm companions exist."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    return (data, os.stat(path).st_mtime_ns,
            [s for s in ("-wal", "-shm", "-journal") if os.path.exists(path + s)])


###############################################################################
# Helpers: processes, through /proc ###########################################
###############################################################################

def read_proc(pid, name):
    """/proc/PID/NAME as bytes (b"" if the process is gone)."""
    try:
        with open("/proc/%s/%s" % (pid, name), "rb") as f:
            return f.read()
    except OSError:
        return b""


def pids():
    """Every process but this one."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name ([state, ppid, pgrp, session, ...]),
    or [] if the process is gone."""
    stat_ = read_proc(pid, "stat")
    return stat_.rsplit(b")", 1)[1].split() if stat_ else []


def proc_state(pid):
    """The state letter of a process in /proc (b"R", b"S", b"T", b"Z", ...), or b"?" if it is gone."""
    return (proc_stat(pid) or [b"?"])[0]


def is_zombie(pid):
    return proc_state(pid) == b"Z"


def processes_running(needle):
    """Pids of live processes whose command line contains `needle` (zombies have none)."""
    needle = needle.encode() if isinstance(needle, str) else needle
    return [p for p in pids() if needle in read_proc(p, "cmdline")]


def pids_of_db(db):
    """Live processes started by a worker of `db` (QUEUECTL_DB in their environment)."""
    m = b"\0QUEUECTL_DB=" + os.path.abspath(db).encode() + b"\0"
    return [p for p in pids() if m in b"\0" + read_proc(p, "environ") and proc_state(p) not in (b"Z", b"?")]


def pids_of_session(sid):
    """Live processes of session `sid`. A pool started with start_new_session
    is its supervisor and its workers (each worker has a process group of its
    own), not its jobs (they have sessions of their own)."""
    out = []
    for p in pids():
        fields = proc_stat(p)
        if fields and int(fields[3]) == sid and fields[0] != b"Z":
            out.append(p)
    return out


def kill_all(pids_, sig=signal.SIGKILL):
    for p in pids_:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def kill_session(sid, sig=signal.SIGKILL):
    """`sig` to the leader of session `sid` first (a killed supervisor starts
    no more workers), then to every other process in it: a whole pool."""
    kill_all([sid], sig)
    kill_all(pids_of_session(sid), sig)


def children(pid):
    """Live child processes of `pid` (a pool's workers, under the fork start method)."""
    out = []
    for p in pids():
        fields = proc_stat(p)
        if fields and int(fields[1]) == pid and fields[0] != b"Z":
            cmd = read_proc(p, "cmdline")
            if b"forkserver" not in cmd and b"resource_tracker" not in cmd:
                out.append(p)
    return out


###############################################################################
# The base class ##############################################################
###############################################################################

def sqlite_only(test):
    """Mark a test class, or one test method of a behaviour class, as a test of the SQLite file
    itself (permissions, WAL, locks, old files, SQLite builds): it runs on SQLite only, never
    against another backend (see QueueTestCase.is_sqlite_only)."""
    test.SQLITE_ONLY = True
    return test


class QueueTestCase(unittest.TestCase):
    """A fresh database per test, a private environment, and helpers to drive the CLI."""

    #: True (set by @sqlite_only) for tests of the SQLite file itself; False for behaviour
    #: tests, which must pass on every backend.
    SQLITE_ONLY = False

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="queuectl-test-")
        self.addCleanup(tmp.cleanup)
        self.tmp = os.path.realpath(tmp.name)
        self.db = self.new_db("q")
        self.tag = "%s:%d:%d" % (self.id(), os.getpid(), random.randrange(10 ** 9))
        self.pools = []
        # In-process commands run with the temp dir as cwd (jobs run where they were
        # enqueued) and never see the developer's own queue.
        old_cwd = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, old_cwd)
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in (queuectl.DB_ENV, "QUEUECTL_BUSY_TIMEOUT", "QUEUECTL_ALLOW_NETWORK_FS"):
            os.environ.pop(name, None)
        os.environ["XDG_DATA_HOME"] = os.path.join(self.tmp, "xdg-default")
        # Registered last, so it runs first: no process of ours outlives the test.
        self.addCleanup(self.kill_leftovers)

    def is_sqlite_only(self):
        """Is this test (its class or its method) marked @sqlite_only?"""
        return getattr(getattr(self, self._testMethodName), "SQLITE_ONLY", False) or self.SQLITE_ONLY

    # -- the database --------------------------------------------------------------

    def new_db(self, name):
        """A fresh, empty database location for this test (`name` tells several apart): a file
        in the temp dir. The one place that chooses where a test's database lives; a backend
        other than SQLite overrides it (and `connect`)."""
        return os.path.join(self.tmp, name + ".db")

    def connect(self, db=None, readonly=True):
        """A raw DB-API connection to the database (the caller closes it)."""
        db = db or self.db
        if readonly:
            return sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=DEADLINE)
        return sqlite3.connect(db, timeout=DEADLINE)

    def open_store(self, db=None, **kw):
        """queuectl's store on the database (or another one from new_db), closed at cleanup."""
        store = queuectl.open_store(db or self.db, **kw)
        self.addCleanup(store.close)
        return store

    def query(self, sql, *params, db=None):
        """Rows of a read-only query, as dicts."""
        conn = self.connect(db)
        try:
            cur = conn.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    def query_one(self, sql, *params, db=None):
        """The first column of the first row of a read-only query."""
        return list(self.query(sql, *params, db=db)[0].values())[0]

    def db_dump(self, db=None):
        """Everything in the database, for before/after comparisons: user_version, the schema,
        and every row of every table in storage order (None if there is no database file).
        Opened read-only."""
        db = db or self.db
        if not os.path.isfile(db):
            return None
        conn = self.connect(db)
        try:
            dump = {"user_version": conn.execute("PRAGMA user_version").fetchone()[0],
                    "schema": conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()}
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                dump[table] = conn.execute('SELECT * FROM "%s"' % table).fetchall()
            return dump
        finally:
            conn.close()

    # -- in-process CLI ------------------------------------------------------------

    def run_cli_bytes(self, *args, stdin=b"", db=True):
        """queuectl.main(argv) with stdin/stdout/stderr captured as bytes: (code, out, err)."""
        argv = (["--db", self.db] if db else []) + [str(a) for a in args]
        out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
        out = io.TextIOWrapper(out_bytes, encoding="utf-8")
        err = io.TextIOWrapper(err_bytes, encoding="utf-8")
        inp = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        saved = sys.stdin, sys.stdout, sys.stderr
        sys.stdin, sys.stdout, sys.stderr = inp, out, err
        try:
            code = queuectl.main(argv)
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved
            out.flush()
            err.flush()
        return code, out_bytes.getvalue(), err_bytes.getvalue()

    def run_cli(self, *args, stdin=b"", db=True):
        """Like run_cli_bytes, with stdout and stderr decoded as UTF-8."""
        code, out, err = self.run_cli_bytes(*args, stdin=stdin, db=db)
        return code, out.decode("utf-8"), err.decode("utf-8")

    def expect_success(self, *args, err="", stdin=b"", db=True):
        """Assert exit 0 and the given stderr (exactly; None: anything). Returns stdout."""
        code, out, errtext = self.run_cli(*args, stdin=stdin, db=db)
        where = "queuectl %s\nstdout: %r\nstderr: %r" % (" ".join(map(str, args)), out, errtext)
        self.assertEqual(code, 0, where)
        self.assertNotIn("Traceback", errtext, where)
        if err is not None:
            self.assertEqual(errtext, err, where)
        return out

    def expect_failure(self, *args, code=1, err=None, err_prefix=None, stdin=b"", db=True,
                       check_db=True):
        """Assert a non-zero exit (exactly `code`), empty stdout, one line on stderr starting with
        'queuectl: error: ' (exactly `err` if given), no traceback and an unchanged database.
        Returns the error line."""
        before = self.db_dump() if check_db else None
        rc, out, errtext = self.run_cli(*args, stdin=stdin, db=db)
        where = "queuectl %s\nexit: %s\nstdout: %r\nstderr: %r" % (
            " ".join(map(str, args)), rc, out, errtext)
        self.assertEqual(rc, code, where)
        self.assertEqual(out, "", where)
        self.assertNotIn("Traceback", errtext, where)
        self.assertTrue(errtext.endswith("\n"), where)
        lines = errtext.splitlines()
        self.assertEqual(len(lines), 1, where)
        self.assertTrue(lines[0].startswith("queuectl: error: "), where)
        if err is not None:
            self.assertEqual(lines[0], err, where)
        if err_prefix is not None:
            self.assertTrue(lines[0].startswith(err_prefix), where)
        if check_db:
            after = self.db_dump()
            if before is None:
                self.assertFalse(after and any(after.get(t) for t in ("jobs", "runs", "config")),
                                 "an error wrote to a new database: " + where)
            else:
                self.assertEqual(before, after, "an error changed the database: " + where)
        return lines[0]

    def init_db(self):
        """Create the database the way a user does: with a command that writes."""
        self.expect_success("config", "set", "max_retries", "3", err=None)

    def add(self, command, **fields):
        """Enqueue one job from JSON through the CLI; returns its id."""
        obj = dict(fields, command=command)
        out = self.expect_success("enqueue", json.dumps(obj))
        self.assertRegex(out, r"^\S+\n$")
        return out.strip()

    def job(self, job_id):
        """The job as `show --json` prints it."""
        return json.loads(self.expect_success("show", job_id, "--json"))

    def jobs(self, *args):
        """Every job as `list --json` prints it."""
        return json.loads(self.expect_success("list", "--limit", "0", "--json", *args))

    def jobs_by_id(self, *args):
        """{id: job} of every job as `list --json` prints it."""
        return {j["id"]: j for j in self.jobs(*args)}

    def dlq_ids(self):
        return [j["id"] for j in json.loads(self.expect_success("dlq", "list", "--json"))]

    # -- what jobs leave behind ----------------------------------------------------------

    def ledger_path(self, name="ledger"):
        return os.path.join(self.tmp, name)

    def ledger_text(self, name="ledger"):
        """What jobs appended to the ledger file ("" if none did)."""
        try:
            with open(self.ledger_path(name)) as f:
                return f.read()
        except OSError:
            return ""

    def ledger(self, name="ledger"):
        """The words jobs appended to the ledger file."""
        return self.ledger_text(name).split()

    def ledger_lines(self, name="ledger"):
        """The whole lines jobs appended to the ledger file."""
        return self.ledger_text(name).split("\n")[:-1]

    def ledger_command(self, text="$QUEUECTL_JOB_ID", name="ledger"):
        """A command that appends `text` to the ledger."""
        return "echo %s >> %s" % (text, shlex.quote(self.ledger_path(name)))

    def ledger_job(self, body):
        """A command that appends `start <id>` and `end <id>` to the ledger around `body`."""
        return "%s; %s; %s" % (self.ledger_command('"start $QUEUECTL_JOB_ID"'), body,
                               self.ledger_command('"end $QUEUECTL_JOB_ID"'))

    def marker(self):
        """A unique sleep duration, so a test can find exactly its own processes."""
        return "300.%010d" % random.randrange(10 ** 10)

    # -- waiting -----------------------------------------------------------------------

    def wait_until(self, predicate, timeout=DEADLINE, message="condition", interval=0.02):
        """Poll until predicate() is true and return its value; fail with `message` (and the
        pool logs) at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                text = message() if callable(message) else message
                self.fail("timed out after %gs waiting for %s%s" % (timeout, text, self.pool_logs()))
            time.sleep(interval)

    def wait_state(self, job_id, *states, timeout=DEADLINE):
        box = {}

        def reached():
            box["job"] = self.job(job_id)
            return box["job"]["state"] in states

        self.wait_until(reached, timeout, lambda: "job %s to be %s (it is %s)" % (
            job_id, " or ".join(states), box.get("job", {}).get("state")), interval=0.05)
        return box["job"]

    # -- real processes ----------------------------------------------------------------

    def env(self, **extra):
        """This process's (cleaned) environment with the test's tag, and `extra`."""
        env = dict(os.environ)
        env[TAG_ENV] = self.tag
        env.update(extra)
        return env

    def cli_argv(self, *args, db=True, python_flags=()):
        """argv of `python queuectl.py --db DB ARGS`: `db` True for the test's database, a
        database location, or False for no --db."""
        argv = [sys.executable] + list(python_flags) + [QUEUECTL]
        if db:
            argv += ["--db", self.db if db is True else db]
        return argv + [str(a) for a in args]

    def spawn(self, *args, db=True, python_flags=(), env=None, cwd=None, **popen):
        """Start queuectl ARGS as a real process in the background (killed at cleanup as every
        tagged process is); `env` defaults to self.env(), `cwd` to the temp dir."""
        return subprocess.Popen(self.cli_argv(*args, db=db, python_flags=python_flags),
                                env=env or self.env(), cwd=cwd or self.tmp, **popen)

    def script(self, *args, db=True, env=None, stdin=None, cwd=None, timeout=SCRIPT_DEADLINE,
               python_flags=(), nofile=None):
        """Run queuectl ARGS as a real process (its own session) to the end:
        (code, stdout bytes, stderr bytes). `nofile`: its (soft, hard) limit of open files."""
        proc = self.spawn(*args, db=db, python_flags=python_flags, env=env, cwd=cwd,
                          stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                          preexec_fn=nofile and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)))
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            out, err = proc.communicate()
            self.fail("%s did not finish within %gs\nstdout: %r\nstderr: %r" % (
                " ".join(proc.args), timeout, out[-2000:], err[-2000:]))
        return proc.returncode, out, err

    def script_text(self, *args, check=True, **kw):
        """Like script, with stdout and stderr decoded; asserts exit 0 unless check=False."""
        code, out, err = self.script(*args, **kw)
        out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if check:
            self.assertEqual(code, 0, "queuectl %s failed (%d): %s" % (" ".join(map(str, args)), code, err))
            self.assertNotIn("Traceback", err)
        return code, out, err

    def run_once(self, count=1, timeout=SCRIPT_DEADLINE):
        """`worker start --once` as a real process; asserts exit 0 and no stdout. Returns its log."""
        code, out, err = self.script("worker", "start", "--once", "--count", count, timeout=timeout)
        log = err.decode("utf-8", "replace")
        self.assertEqual(code, 0, log)
        self.assertEqual(out, b"", log)
        self.assertNotIn("Traceback", log)
        return log

    def start_pool(self, *args, count=None, env=None, stdin=subprocess.DEVNULL):
        """Start `worker start [--count N] ARGS` in the background (its own session), with `env`
        added to the test's environment; killed at cleanup."""
        n = len(self.pools) + 1
        if count is not None:
            args = ("--count", count) + args
        with open(os.path.join(self.tmp, "pool%d.log" % n), "wb") as log, \
                open(os.path.join(self.tmp, "pool%d.out" % n), "wb") as out:
            proc = self.spawn("worker", "start", *args, env=self.env(**(env or {})),
                              stdin=stdin, stdout=out, stderr=log, start_new_session=True)
        proc.log_path = log.name
        proc.out_path = out.name
        self.pools.append(proc)
        self.addCleanup(self.stop_pool, proc)
        return proc

    def stop_pool(self, proc):
        if proc.poll() is None:
            kill_session(proc.pid)
        proc.wait(10)
        if proc.stdin:
            proc.stdin.close()

    def pool_log(self, proc):
        with open(proc.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def pool_logs(self):
        return "".join("\n--- pool %d log ---\n%s" % (proc.pid, self.pool_log(proc)[-3000:])
                       for proc in self.pools)

    def wait_pool(self, proc, timeout=DEADLINE):
        """Wait for a pool to exit; returns its exit code. Asserts it printed nothing on stdout."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail("worker pool did not exit within %gs%s" % (timeout, self.pool_logs()))
        with open(proc.out_path, "rb") as f:
            self.assertEqual(f.read(), b"", "a worker pool wrote to stdout")
        self.assertNotIn("Traceback", self.pool_log(proc))
        return code

    def workers(self, check=True):
        """The workers as `status --json` lists them (None if status failed and not check)."""
        code, out, err = self.run_cli("status", "--json")
        if check:
            self.assertEqual(code, 0, err)
        return json.loads(out)["workers"] if code == 0 else None

    def wait_pool_ready(self, proc, count, timeout=10):
        """Until the pool's workers are registered (and its signal handlers set)."""
        self.wait_until(lambda: len(self.workers(check=False) or ()) >= count,
                        timeout, "%d workers to register" % count, interval=0.1)

    def has_db_open(self, pid, path=None):
        """Has process `pid` opened the database (so it is past start-up, inside the command),
        or the file at `path`?"""
        fds = "/proc/%d/fd" % pid
        path = path or self.db
        try:
            return any(os.readlink(os.path.join(fds, fd)) == path for fd in os.listdir(fds))
        except OSError:
            return False

    def kill_leftovers(self):
        """SIGKILL every process that carries this test's tag (pools, workers and their jobs)."""
        for proc in self.pools:
            if proc.poll() is None:
                kill_session(proc.pid)
        needle = ("\0%s=%s\0" % (TAG_ENV, self.tag)).encode()
        kill_all([pid for pid in pids() if needle in b"\0" + read_proc(pid, "environ")])
        for proc in self.pools:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


###############################################################################
# Install: queuectl.py as a program ###########################################
###############################################################################

class TestScript(QueueTestCase):
    """queuectl.py as a program: installed by copying, its exit codes, pipes, signals and bytecode cache."""

    @sqlite_only     # the python3 on PATH, with no PostgreSQL driver
    def test_runs_with_nothing_installed(self):
        # -I: no user site, no PYTHONPATH; -S: no site-packages at all.
        flags = ("-I", "-S")
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        code, out, err = self.script("--version", db=False, python_flags=flags, cwd=elsewhere)
        self.assertEqual((code, out, err), (0, ("queuectl %s\n" % queuectl.__version__).encode(), b""))
        code, out, err = self.script("enqueue", "--", "echo ran > ran.txt", python_flags=flags, cwd=elsewhere)
        self.assertEqual(code, 0, err)
        job_id = out.decode().strip()
        code, out, err = self.script("worker", "start", "--once", python_flags=flags, cwd=elsewhere)
        self.assertEqual(code, 0, err)
        code, out, err = self.script("wait", job_id, "--timeout", "10", python_flags=flags)
        self.assertEqual((code, out, err), (0, b"", b""))
        self.assertTrue(os.path.exists(os.path.join(elsewhere, "ran.txt")))

    def test_executable_with_shebang(self):
        self.assertTrue(os.access(QUEUECTL, os.X_OK), "queuectl.py is not executable")
        with open(QUEUECTL, "rb") as f:
            self.assertTrue(f.readline().startswith(b"#!"))
        # `#!/usr/bin/env python3` finds python3 on PATH: make that the Python under test.
        bindir = os.path.join(self.tmp, "bin")
        os.mkdir(bindir)
        os.symlink(sys.executable, os.path.join(bindir, "python3"))
        env = self.env(PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        proc = subprocess.run([QUEUECTL, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, timeout=DEADLINE)
        self.assertEqual((proc.returncode, proc.stderr), (0, b""))
        self.assertEqual(proc.stdout, ("queuectl %s\n" % queuectl.__version__).encode())

    # -- installed by copying: sh execs Python on a cached byte-compiled copy ----

    def install_copy(self):
        """`install -m 755 queuectl.py BIN/queuectl`, python3 on PATH the Python under
        test, and a cache of our own: returns a function running BIN/queuectl."""
        bindir = os.path.join(self.tmp, "bin")
        os.mkdir(bindir)
        self.installed = os.path.join(bindir, "queuectl")
        shutil.copy(QUEUECTL, self.installed)
        os.chmod(self.installed, 0o755)
        os.symlink(sys.executable, os.path.join(bindir, "python3"))
        self.cache = os.path.join(self.tmp, "cache")
        env = self.env(PATH=bindir + os.pathsep + os.environ.get("PATH", ""), XDG_CACHE_HOME=self.cache)

        def run(*args, stdin=b"", cwd=None, **extra):
            proc = subprocess.run([self.installed, "--db", self.db] + list(args), input=stdin,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or self.tmp,
                                  env=dict(env, **extra), timeout=DEADLINE)
            return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
        return run

    def cached_files(self):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(self.cache, "queuectl"))
                      for f in files)

    @sqlite_only     # the python3 on PATH, with no PostgreSQL driver
    def test_installed_copy_runs_from_cached_bytecode(self):
        run = self.install_copy()
        self.assertEqual(run("--version"), (0, "queuectl %s\n" % queuectl.__version__, ""))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.cache, "queuectl")).st_mode), 0o700)
        [pyc] = self.cached_files()
        self.assertIn(self.tmp.lstrip(os.sep), pyc)          # named after where the copy lives
        written = os.stat(pyc).st_mtime_ns
        # Arguments and stdin reach the command as given, through sh's "$@".
        code, job_id, err = run("enqueue", "--id", "w", "--", "printf", "%s|", "a b", "$HOME", "it's", "")
        self.assertEqual((code, job_id, err), (0, "w\n", ""))
        self.assertEqual(run("enqueue", "--file", "-", stdin=b'{"id": "s", "command": "true"}\n')[:2], (0, "s\n"))
        self.assertEqual(self.job("w")["command"], "printf '%s|' 'a b' '$HOME' 'it'\"'\"'s' ''")
        self.assertEqual(run("show", "nope")[0], 1)
        self.assertEqual(os.stat(pyc).st_mtime_ns, written)   # read, not compiled again
        # A new copy of a different version is compiled afresh, same size or not.
        with open(QUEUECTL) as f:
            source = f.read().replace('__version__ = "%s"' % queuectl.__version__, '__version__ = "9.9.9"')
        with open(self.installed, "w") as f:
            f.write(source)
        os.utime(self.installed, (time.time() + 5, time.time() + 5))
        self.assertEqual(run("--version"), (0, "queuectl 9.9.9\n", ""))

    def plant_bytecode(self, version):
        """Write where the cached copy goes a valid one that says `version`."""
        run = self.install_copy()
        run("--version")
        [pyc] = self.cached_files()
        fake = os.path.join(self.tmp, "fake.py")
        with open(QUEUECTL) as f:
            source = f.read().replace('__version__ = "%s"' % queuectl.__version__, '__version__ = "%s"' % version)
        with open(fake, "w") as f:
            f.write(source)
        st = os.stat(self.installed)
        self.assertEqual(os.path.getsize(fake), st.st_size)
        os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
        py_compile.compile(fake, cfile=pyc, doraise=True)
        return run

    def test_cached_bytecode_is_used_only_from_a_private_directory(self):
        run = self.plant_bytecode("6.6.6")
        self.assertEqual(run("--version")[1], "queuectl 6.6.6\n")   # the cache is what runs
        for mode in (0o770, 0o707):
            os.chmod(os.path.join(self.cache, "queuectl"), mode)
            self.assertEqual(run("--version"), (0, "queuectl %s\n" % queuectl.__version__, ""))
        os.chmod(os.path.join(self.cache, "queuectl"), 0o700)
        os.chmod(self.cache, 0o777)                            # writable above it: as bad
        self.assertEqual(run("--version")[1], "queuectl %s\n" % queuectl.__version__)

    def test_installed_copy_without_a_usable_cache(self):
        run = self.plant_bytecode("6.6.6")
        [pyc] = self.cached_files()
        with open(pyc, "r+b") as f:                             # a damaged copy: valid header only
            f.seek(16)
            f.write(b"\xff" * 64)
        self.assertEqual(run("--version"), (0, "queuectl %s\n" % queuectl.__version__, ""))
        nowhere = os.path.join(self.tmp, "file")
        open(nowhere, "w").close()
        self.assertEqual(run("--version", XDG_CACHE_HOME=nowhere),
                         (0, "queuectl %s\n" % queuectl.__version__, ""))

    @sqlite_only     # the python3 on PATH, with no PostgreSQL driver
    def test_installed_copy_does_not_import_from_the_current_directory(self):
        run = self.install_copy()
        cwd = os.path.join(self.tmp, "shared")
        os.mkdir(cwd)
        for name in ("json", "argparse", "shlex", "subprocess", "datetime"):
            with open(os.path.join(cwd, name + ".py"), "w") as f:
                f.write("open(%r, 'w').close()\n" % os.path.join(self.tmp, "imported-" + name))
        self.assertEqual(run("enqueue", "--", "true", cwd=cwd)[0], 0)
        self.assertEqual(run("list", "--json", cwd=cwd)[0], 0)
        self.assertEqual([f for f in os.listdir(self.tmp) if f.startswith("imported-")], [])

    def test_exit_codes_and_no_tracebacks(self):
        self.script("enqueue", '{"id": "x", "command": "exit 5", "max_retries": 0}')
        cases = [
            (("enqueue", "{bad"), 1),
            (("enqueue", '{"command": "x", "id": "x"}'), 1),
            (("show", "nope"), 1),
            (("list", "--state", "nope"), 1),
            (("config", "set", "nope", "1"), 1),
            (("bogus",), 2),
            (("list", "--limit", "x"), 2),
        ]
        for args, expected in cases:
            with self.subTest(args=args):
                code, out, err = self.script(*args)
                self.assertEqual(code, expected, err)
                self.assertEqual(out, b"")
                self.assertNotIn(b"Traceback", err)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertTrue(err.startswith(b"queuectl: error: "), err)
        code, out, err = self.script("wait", "x", "--timeout", "0.1")
        self.assertEqual((code, out), (124, b""))
        self.run_once()
        self.assertEqual(self.script("wait", "x")[0], 5)
        code, out, err = self.script("-h", db=False)
        self.assertEqual((code, err), (0, b""))
        self.assertTrue(out.startswith(b"usage: queuectl"))
        code, out, err = self.script()      # a bare `queuectl`: the help, as a usage error
        self.assertEqual((code, out), (2, b""))
        self.assertTrue(err.startswith(b"usage: queuectl"), err)
        self.assertIn(b"\nexit codes:", err)

    def test_debug_shows_the_traceback(self):
        self.init_db()
        code, out, err = self.script("--debug", "show", "nope")
        self.assertEqual((code, out), (1, b""))
        self.assertIn(b"queuectl: error: job 'nope' not found", err)
        self.assertIn(b"Traceback", err)

    def test_worker_start_on_a_bad_database_is_one_error(self):
        os.mkdir(os.path.join(self.tmp, "adir"))
        self.db = os.path.join(self.tmp, "adir")
        code, out, err = self.script("worker", "start", "--once", "--count", "2")
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err.decode(),
                         "queuectl: error: cannot open database %s: it is a directory\n" % self.db)

    def test_ctrl_c_during_wait_exits_130(self):
        job_id = self.add("true")
        # A shell starts background jobs with SIGINT ignored, and Python keeps it so: give
        # `wait` the default disposition a terminal would, whoever runs the tests.
        proc = self.spawn("wait", job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        self.wait_until(lambda: self.has_db_open(proc.pid), 10, "wait to open the database")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE)
        self.assertEqual((proc.returncode, out), (130, b""))
        self.assertNotIn(b"Traceback", err)

    def test_non_utf8_arguments_are_one_error_line(self):
        self.init_db()
        before = self.db_dump()
        for args in ([b"enqueue", b"--", b"echo \xff"], [b"enqueue", b'{"command": "echo \xff"}'],
                     [b"show", b"\xff"], [b"enqueue", b"--id", b"a\xff", b"--", b"true"],
                     [b"list", b"--state", b"\xff"]):
            with self.subTest(args=args):
                argv = [os.fsencode(sys.executable), os.fsencode(QUEUECTL), b"--db", os.fsencode(self.db)]
                proc = subprocess.run(argv + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=self.env(), timeout=DEADLINE)
                self.assertEqual((proc.returncode, proc.stdout), (1, b""), proc.stderr)
                self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
                self.assertTrue(proc.stderr.startswith(b"queuectl: error: "), proc.stderr)
        self.assertEqual(self.db_dump(), before)

    def test_broken_pipe_is_quiet(self):
        path = os.path.join(self.tmp, "jobs.jsonl")
        with open(path, "w") as f:
            for i in range(3000):
                f.write('{"command": "echo a fairly long command line to fill the pipe %d"}\n' % i)
        self.expect_success("enqueue", "--file", path)
        command = "%s %s --db %s list --limit 0 | head -n 1" % (
            shlex.quote(sys.executable), shlex.quote(QUEUECTL), shlex.quote(self.db))
        proc = subprocess.run(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=self.env(), timeout=DEADLINE)
        self.assertEqual(proc.stderr, b"")
        self.assertTrue(proc.stdout.startswith(b"ID"), proc.stdout)

    def test_run_at_without_offset_is_local_time(self):
        # JST-9 is a POSIX TZ string (UTC+9, no DST): it needs no tz database.
        env = self.env(TZ="JST-9")
        job = '{"id": "tz", "command": "true", "run_at": "2030-01-01T12:00:00"}'
        code, out, err = self.script("enqueue", job, env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(iso_to_ts(self.job("tz")["run_at"]), 1893456000 + 3 * 3600)
        code, out, err = self.script("enqueue", "--run-at", "2030-01-01T12:00:00", "--id", "tz2",
                                     "--", "true", env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(iso_to_ts(self.job("tz2")["run_at"]), 1893456000 + 3 * 3600)


###############################################################################
# enqueue, and bad input ######################################################
###############################################################################

class TestEnqueue(QueueTestCase):
    """enqueue takes a job as JSON, a file or flags, prints only ids, and writes nothing when refused."""

    def test_json_object_prints_only_the_id(self):
        code, out, err = self.run_cli("enqueue", '{"command": "echo hello"}')
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"^[0-9a-z]+\n$")
        job = self.job(out.strip())
        for field in JOB_JSON_FIELDS:
            self.assertIn(field, job)
        self.assertEqual(job["command"], "echo hello")
        self.assertEqual((job["state"], job["attempts"], job["max_retries"], job["priority"],
                          job["timeout"], job["exit_code"]), ("pending", 0, 3, 0, None, None))
        for field in ("run_at", "created_at", "updated_at"):
            self.assertLess(abs(iso_to_ts(job[field]) - time.time()), 60, field)

    def test_all_fields(self):
        job_id = self.add("true", id="backup-1", max_retries=1, priority=7, timeout="2m")
        self.assertEqual(job_id, "backup-1")
        job = self.job("backup-1")
        self.assertEqual((job["max_retries"], job["priority"], job["timeout"]), (1, 7, 120))
        delayed = self.job(self.add("true", delay="10m"))
        self.assertAlmostEqual(iso_to_ts(delayed["run_at"]) - iso_to_ts(delayed["created_at"]), 600, delta=1)
        delayed = self.job(self.add("true", delay=90))
        self.assertAlmostEqual(iso_to_ts(delayed["run_at"]) - iso_to_ts(delayed["created_at"]), 90, delta=1)
        at = self.job(self.add("true", run_at="2030-01-01T00:00:00Z"))
        self.assertEqual(iso_to_ts(at["run_at"]), 1893456000)
        at = self.job(self.add("true", run_at="2030-01-01T03:00:00+03:00"))
        self.assertEqual(iso_to_ts(at["run_at"]), 1893456000)
        self.assertIsNone(self.job(self.add("true", timeout=None))["timeout"])

    def test_generated_ids_are_unique_and_sortable(self):
        ids = [self.add("true") for _ in range(30)]
        self.assertEqual(len(set(ids)), 30)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual([j["id"] for j in self.jobs()], ids)

    def test_file_with_object_array_and_json_lines(self):
        path = os.path.join(self.tmp, "jobs.json")
        with open(path, "w") as f:
            f.write('{"id": "o1", "command": "true"}\n')
        self.assertEqual(self.expect_success("enqueue", "--file", path), "o1\n")
        with open(path, "w") as f:
            json.dump([{"id": "a1", "command": "true"}, {"id": "a2", "command": "false", "priority": 2}], f)
        self.assertEqual(self.expect_success("enqueue", "--file", path), "a1\na2\n")
        with open(path, "w") as f:
            f.write('{"id": "l1", "command": "true"}\n\n{"id": "l2", "command": "true"}\n'
                    '{"command": "true"}\n')
        out = self.expect_success("enqueue", "-f", path).splitlines()
        self.assertEqual(out[:2], ["l1", "l2"])
        self.assertEqual(len(out), 3)
        self.assertEqual(self.job("a2")["priority"], 2)

    def test_json_lines_split_on_newlines_only(self):
        commands = ["echo 'a\u2028b'", "echo 'c\u2029d'", "echo 'e\u0085f'"]
        text = "".join(json.dumps({"command": c}, ensure_ascii=False) + "\r\n" for c in commands)
        out = self.expect_success("enqueue", "-f", "-", stdin=text.encode("utf-8"))
        self.assertEqual(len(out.split()), 3)
        self.assertEqual([j["command"] for j in self.jobs()], commands)
        bad = text + '{"command": "x", "bogus": 1}\n'
        self.expect_failure("enqueue", "-f", "-", stdin=bad.encode("utf-8"), err_prefix=(
            "queuectl: error: line 4: unknown field 'bogus'"))

    def test_current_directory_that_is_not_utf8(self):
        where = os.path.join(os.fsencode(self.tmp), b"caf\xe9")
        os.mkdir(where)
        os.chdir(where)
        self.expect_failure("enqueue", "--", "true", err=(
            "queuectl: error: the current directory %s/caf\\xe9 is not valid UTF-8, so it cannot be stored "
            "as the job's directory; enqueue from another directory" % self.tmp))

    def test_json_array_as_the_argument(self):
        out = self.expect_success("enqueue", '[{"command": "true", "id": "a1"}, {"command": "false", "id": "a2"}]')
        self.assertEqual(out, "a1\na2\n")
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            self.assertIn("**one JSON object** as the argument, or a JSON array of them", f.read())

    def test_file_from_stdin(self):
        data = b'{"id": "s1", "command": "true"}\n{"id": "s2", "command": "true"}\n'
        self.assertEqual(self.expect_success("enqueue", "--file", "-", stdin=data), "s1\ns2\n")
        self.assertEqual([j["id"] for j in self.jobs()], ["s1", "s2"])

    def test_file_is_all_or_nothing(self):
        self.add("true", id="existing")
        path = os.path.join(self.tmp, "jobs.jsonl")
        lines = ['{"id": "f1", "command": "true"}', '{"id": "f2", "command": "true"}',
                 '{"id": "f3", "command": ""}', '{"id": "f4", "command": "true"}']
        cases = [
            ("\n".join(lines) + "\n", {"err": "queuectl: error: line 3: field 'command' must not be empty"}),
            ('{"id": "f1", "command": "true"}\n{"id": "f2", "command": "true"\n',
             {"err_prefix": "queuectl: error: line 2: invalid JSON"}),
            (json.dumps([{"id": "f1", "command": "true"}, {"id": "f2", "command": "true", "prio": 1}]),
             {"err_prefix": "queuectl: error: item 2: unknown field 'prio'"}),
            ('{"id": "f1", "command": "true"}\n{"id": "existing", "command": "true"}\n',
             {"err": "queuectl: error: job 'existing' already exists"}),
            ('{"id": "f1", "command": "true"}\n{"id": "f1", "command": "true"}\n',
             {"err": "queuectl: error: job 'f1' appears twice in the input"}),
        ]
        for text, expected in cases:
            with open(path, "w") as f:
                f.write(text)
            self.expect_failure("enqueue", "--file", path, **expected)
        self.assertEqual([j["id"] for j in self.jobs()], ["existing"])

    def test_file_errors(self):
        self.init_db()
        missing = os.path.join(self.tmp, "missing.json")
        self.expect_failure("enqueue", "--file", missing,
                            err="queuectl: error: cannot read %s: No such file or directory" % missing)
        path = os.path.join(self.tmp, "bad.json")
        with open(path, "wb") as f:
            f.write(b'{"command": "echo \xff"}')
        self.expect_failure("enqueue", "--file", path, err_prefix="queuectl: error: %s: invalid UTF-8" % path)
        with open(path, "w") as f:
            f.write("  \n")
        self.expect_failure("enqueue", "--file", path, err="queuectl: error: no jobs in input")
        self.expect_failure("enqueue", "--file", path, '{"command": "true"}', code=2)

    def test_flag_form(self):
        out = self.expect_success("enqueue", "--priority", "5", "--timeout", "60", "--",
                                  "tar", "czf", "x.tgz", "dir")
        job = self.job(out.strip())
        self.assertEqual((job["command"], job["priority"], job["timeout"]), ("tar czf x.tgz dir", 5, 60))
        # One argument after -- is a shell command line as it is.
        job = self.job(self.expect_success("enqueue", "--", "echo a | tr a b > piped.txt").strip())
        self.assertEqual(job["command"], "echo a | tr a b > piped.txt")
        # Several arguments are quoted, so they reach the program as they were given.
        job = self.job(self.expect_success("enqueue", "--id", "words", "--max-retries", "0", "--",
                                           "printf", "%s\\n", "a b", "$HOME", "--priority").strip())
        self.assertEqual((job["id"], job["max_retries"], job["priority"]), ("words", 0, 0))
        job = self.job(self.expect_success("enqueue", "--priority", "-5", "--", "true").strip())
        self.assertEqual(job["priority"], -5)
        job = self.job(self.expect_success("enqueue", "--delay", "1h", "--", "true").strip())
        self.assertAlmostEqual(iso_to_ts(job["run_at"]) - iso_to_ts(job["created_at"]), 3600, delta=1)
        out = self.expect_success("enqueue", "--run-at", "2030-01-01T00:00:00Z", "--", "true")
        job = self.job(out.strip())
        self.assertEqual(iso_to_ts(job["run_at"]), 1893456000)
        self.run_once()
        self.assertEqual(self.expect_success("logs", "words"), "a b\n$HOME\n--priority\n")
        with open(os.path.join(self.tmp, "piped.txt")) as f:
            self.assertEqual(f.read(), "b\n")

    def test_invalid_jobs_write_nothing(self):
        self.add("true", id="a")
        self.expect_success("config", "set", "max_retries", "5", err=None)
        cases = [
            ('{"command": "x", "id": "a"}', "job 'a' already exists"),
            ("{}", "field 'command' is required"),
            ('{"command": ""}', "field 'command' must not be empty"),
            ('{"command": "   "}', "field 'command' must not be empty"),
            ('{"command": null}', "field 'command' is required"),
            ('{"command": 5}', "field 'command' must be a string, not an integer"),
            ('{"command": ["ls"]}', "field 'command' must be a string, not an array"),
            ('{"command": "x", "priority": "5"}', "field 'priority' must be an integer, not a string"),
            ('{"command": "x", "priority": 1.5}', "field 'priority' must be an integer, not a number"),
            ('{"command": "x", "max_retries": true}',
             "field 'max_retries' must be an integer, not a boolean"),
            ('{"command": "x", "max_retries": -1}',
             "field 'max_retries' must be between 0 and 1000000, not -1"),
            ('{"command": "x", "comand": "y"}', "unknown field 'comand' (did you mean 'command'?) "
             "(valid: id, command, max_retries, priority, run_at, delay, timeout, queue, after, unique, env)"),
            ('{"command": "x", "priorty": 1}', "unknown field 'priorty' (did you mean 'priority'?) "
             "(valid: id, command, max_retries, priority, run_at, delay, timeout, queue, after, unique, env)"),
            ('{"command": "x", "run_at": "tomorrow"}', "field 'run_at': invalid time 'tomorrow' "
             "(use ISO-8601, e.g. 2026-01-31T14:00:00 or ...+02:00)"),
            ('{"command": "x", "run_at": 1700000000}', None),
            ('{"command": "x", "delay": -5}', "field 'delay': duration must not be negative: -5"),
            ('{"command": "x", "delay": "-5s"}', None),
            ('{"command": "x", "delay": "soon"}', None),
            ('{"command": "x", "run_at": "2030-01-01T00:00:00Z", "delay": 5}',
             "give either 'run_at' or 'delay', not both"),
            ('{"command": "x", "timeout": 0}', "field 'timeout' must be positive (use null for no timeout)"),
            ('{"command": "x", "timeout": "-1m"}', None),
            ('{"command": "x", "id": "no spaces"}', None),
            ('{"command": "x", "id": 7}', None),
            ('{"command": "x", "command": "y"}', None),
            ('{"command": "x", "priority": NaN}', None),
            ('"echo hi"', "a job must be a JSON object, not a string"),
            ("[]", "no jobs in input (empty array)"),
            ('[{"command": "x"}, 3]', "item 2: a job must be a JSON object, not an integer"),
            (json.dumps({"command": "x" * 200000}), None),
            ("{bad", None),
            ('{"command": "x"} trailing', None),
            ("", None),
        ]
        for text, message in cases:
            with self.subTest(json=text):
                if message is None:
                    self.expect_failure("enqueue", text)
                else:
                    self.expect_failure("enqueue", text, err="queuectl: error: " + message)
        self.assertEqual([j["id"] for j in self.jobs()], ["a"])

    def test_command_line_mistakes(self):
        self.init_db()
        self.expect_failure("enqueue", code=2)
        self.expect_failure("enqueue", "--", code=2, err="queuectl: error: no command after --")
        self.expect_failure("enqueue", "--", "", err="queuectl: error: field 'command' must not be empty")
        self.expect_failure("enqueue", '{"command": "a"}', '{"command": "b"}', code=2)
        self.expect_failure("enqueue", "echo", "hi", code=2)
        line = self.expect_failure("enqueue", "echo hi")
        self.assertTrue(line.startswith("queuectl: error: invalid JSON"), line)
        self.assertIn("queuectl enqueue -- COMMAND", line)
        self.expect_failure("enqueue", "--timeout", "-5", "--", "true", code=2)
        self.expect_failure("enqueue", "--timeout", "0", "--", "true")
        self.expect_failure("enqueue", "--delay", "5", "--run-at", "2030-01-01T00:00:00Z", "--", "true")
        self.expect_failure("enqueue", "--id", "x", "--file", "-", code=2,
                            stdin=b'{"command": "a"}\n{"command": "b"}\n')

    def test_flags_are_defaults_for_json(self):
        job = self.job(self.expect_success("enqueue", "--priority", "4", '{"command": "true"}').strip())
        self.assertEqual(job["priority"], 4)
        job = self.job(self.expect_success("enqueue", "--priority", "4", '{"command": "true", "priority": 1}')
                       .strip())
        self.assertEqual(job["priority"], 1)

    def test_a_jobs_own_time_wins_over_a_flag(self):
        jobs = os.path.join(self.tmp, "jobs.jsonl")
        with open(jobs, "w") as f:
            f.write(json.dumps({"id": "own", "command": "true", "run_at": "2030-01-01T00:00:00Z"}) + "\n")
            f.write(json.dumps({"id": "flag", "command": "true"}) + "\n")
        before = time.time()
        self.script_text("enqueue", "--delay", "1h", "--priority", "3", "--file", jobs)
        _, out, _ = self.script_text("list", "--json")
        got = {j["id"]: j for j in json.loads(out)}
        self.assertEqual(got["own"]["run_at"], "2030-01-01T00:00:00.000Z")
        self.assertEqual(got["own"]["priority"], 3)
        flag_at = queuectl.parse_time(got["flag"]["run_at"])
        self.assertAlmostEqual(flag_at, before + 3600, delta=60)


class NonUtf8ArgumentTest(QueueTestCase):
    """A command-line argument that is not UTF-8 (Python sees surrogates) is refused or kept exactly."""

    def test_non_utf8_command_argument(self):
        self.script_text("enqueue", "--id", "x", "--", "true")
        before = self.db_dump()
        code, out, err = self.script("enqueue", "--", os.fsdecode(b"echo caf\xe9"))
        text = err.decode("utf-8", "replace")
        self.assertNotIn("Traceback", text)
        if code == 0:
            # Accepted: then it must run exactly those bytes.
            self.assertEqual(len(out.split()), 1)
        else:
            self.assertEqual(len(text.splitlines()), 1, text)
            self.assertEqual(self.db_dump(), before)

    def test_non_utf8_job_id_argument(self):
        self.script_text("enqueue", "--id", "x", "--", "true")
        before = self.db_dump()
        for args in (["show", os.fsdecode(b"\xff")], ["cancel", os.fsdecode(b"\xff")],
                     ["enqueue", "--id", os.fsdecode(b"\xff"), "--", "true"]):
            code, out, err = self.script(*args)
            text = err.decode("utf-8", "replace")
            with self.subTest(args=args):
                self.assertNotIn("Traceback", text)
                self.assertEqual(code, 1)
                self.assertEqual(len(text.splitlines()), 1, text)
        self.assertEqual(self.db_dump(), before)


TEN_MB = 10 * 1024 * 1024
BIG_JOB = json.dumps({"command": "echo " + "x" * TEN_MB}).encode()


#: (name, argv after `--db DB`, stdin or file contents, words the error must contain, database)
#: database: "seeded" (a queuectl database with jobs; its dump must not change),
#: "absent" (no file; none may be created), or a name handled in BadInputTest.setup_db.
#: Where argv has "{file}", `data` is written to that file; otherwise it is stdin.
BAD_INPUTS = [
    ("malformed_json", ["enqueue", '{"command": '], None, "invalid JSON", "seeded"),
    ("json_not_an_object", ["enqueue", '"echo hi"'], None, "JSON object", "seeded"),
    ("command_is_a_number", ["enqueue", '{"command": 5}'], None, "'command'", "seeded"),
    ("command_missing", ["enqueue", '{"priority": 1}'], None, "'command'", "seeded"),
    ("command_empty", ["enqueue", '{"command": "  "}'], None, "'command'", "seeded"),
    ("priority_is_a_string", ["enqueue", '{"command": "true", "priority": "1"}'], None, "'priority'", "seeded"),
    ("priority_is_a_boolean", ["enqueue", '{"command": "true", "priority": true}'], None, "'priority'", "seeded"),
    ("priority_1e400", ["enqueue", '{"command": "true", "priority": 1e400}'], None, "'priority'", "seeded"),
    ("priority_2_pow_70", ["enqueue", '{"command": "true", "priority": %d}' % 2 ** 70], None, "'priority'",
     "seeded"),
    ("max_retries_negative", ["enqueue", '{"command": "true", "max_retries": -1}'], None, "'max_retries'",
     "seeded"),
    ("max_retries_fraction", ["enqueue", '{"command": "true", "max_retries": 1.5}'], None, "'max_retries'",
     "seeded"),
    ("timeout_not_a_duration", ["enqueue", '{"command": "true", "timeout": "abc"}'], None, "'timeout'",
     "seeded"),
    ("timeout_zero", ["enqueue", '{"command": "true", "timeout": 0}'], None, "'timeout'", "seeded"),
    ("timeout_infinite", ["enqueue", '{"command": "true", "timeout": 1e400}'], None, "'timeout'", "seeded"),
    ("delay_negative", ["enqueue", '{"command": "true", "delay": -5}'], None, "'delay'", "seeded"),
    ("nan", ["enqueue", '{"command": "true", "delay": NaN}'], None, "NaN", "seeded"),
    ("run_at_unparsable", ["enqueue", '{"command": "true", "run_at": "tomorrow"}'], None, "'run_at'", "seeded"),
    ("run_at_out_of_range", ["enqueue", '{"command": "true", "run_at": "0001-01-01T00:00:00"}'], None,
     "'run_at'", "seeded"),
    ("run_at_and_delay", ["enqueue", '{"command": "true", "run_at": "2030-01-01T00:00:00", "delay": 5}'],
     None, "run_at", "seeded"),
    ("unknown_field", ["enqueue", '{"command": "true", "comand": "x"}'], None, "unknown field 'comand'",
     "seeded"),
    ("duplicate_field", ["enqueue", '{"command": "true", "command": "false"}'], None, "twice", "seeded"),
    ("nul_in_command", ["enqueue", '{"command": "echo a\\u0000b"}'], None, "NUL", "seeded"),
    ("lone_surrogate_in_command", ["enqueue", '{"command": "echo \\ud800"}'], None, "'command'", "seeded"),
    ("invalid_id", ["enqueue", '{"command": "true", "id": "-rf"}'], None, "'id'", "seeded"),
    ("existing_id", ["enqueue", '{"command": "true", "id": "seed-pending"}'], None, "already exists",
     "seeded"),
    ("batch_with_one_bad_job", ["enqueue", "--file", "-"],
     b'{"command": "true"}\n{"command": "true", "priority": "high"}\n', "line 2", "seeded"),
    ("deeply_nested_json", ["enqueue", "--file", "-"], b"[" * 100000 + b"]" * 100000, "JSON", "seeded"),
    ("empty_file", ["enqueue", "--file", "{file}"], b"", "no jobs", "seeded"),
    ("whitespace_stdin", ["enqueue", "--file", "-"], b" \n\t\n", "no jobs", "seeded"),
    ("empty_array", ["enqueue", "[]"], None, "no jobs", "seeded"),
    ("file_of_random_bytes", ["enqueue", "--file", "{file}"],
     b"\xff" + random.Random(3).getrandbits(8 * 4095).to_bytes(4095, "big"), "UTF-8", "seeded"),
    ("invalid_utf8_in_file", ["enqueue", "--file", "{file}"], b'{"command": "echo \xff\xfe"}', "UTF-8",
     "seeded"),
    ("missing_file", ["enqueue", "--file", "/nonexistent/jobs.json"], None, "cannot read", "seeded"),
    ("file_is_a_directory", ["enqueue", "--file", "/"], None, "cannot read", "seeded"),
    ("ten_mb_command_on_stdin", ["enqueue", "--file", "-"], BIG_JOB, "too long", "seeded"),
    ("ten_mb_command_in_file", ["enqueue", "--file", "{file}"], BIG_JOB, "too long", "seeded"),
    ("show_unknown_id", ["show", "nope"], None, "not found", "seeded"),
    ("logs_unknown_id", ["logs", "nope"], None, "not found", "seeded"),
    ("logs_of_a_job_that_never_ran", ["logs", "seed-pending"], None, "not run", "seeded"),
    ("wait_unknown_id", ["wait", "nope"], None, "not found", "seeded"),
    ("cancel_unknown_id", ["cancel", "seed-pending", "nope"], None, "not found", "seeded"),
    ("cancel_completed_job", ["cancel", "seed-done"], None, "completed", "seeded"),
    ("dlq_retry_unknown_id", ["dlq", "retry", "nope"], None, "not found", "seeded"),
    ("dlq_retry_job_not_dead", ["dlq", "retry", "seed-dead", "seed-pending"], None, "not in the DLQ",
     "seeded"),
    ("list_unknown_state", ["list", "--state", "running"], None, "unknown state", "seeded"),
    ("config_set_unknown_key", ["config", "set", "max_retry", "3"], None, "unknown config key", "seeded"),
    ("config_get_unknown_key", ["config", "get", "colour"], None, "unknown config key", "seeded"),
    ("config_bad_max_retries", ["config", "set", "max_retries", "-1"], None, "max_retries", "seeded"),
    ("config_bad_backoff_base", ["config", "set", "backoff_base", "0.5"], None, "backoff_base", "seeded"),
    ("config_bad_timeout", ["config", "set", "timeout", "soon"], None, "timeout", "seeded"),
    ("flag_priority_not_a_number", ["enqueue", "--priority", "high", "--", "true"], None, "priority",
     "seeded"),
    ("flag_delay_negative", ["enqueue", "--delay", "-5", "--", "true"], None, "delay", "seeded"),
    ("unknown_command", ["frobnicate"], None, "frobnicate", "seeded"),
    ("db_is_a_directory", ["enqueue", "--", "true"], None, "directory", "directory"),
    ("db_under_a_file", ["enqueue", "--", "true"], None, "not a directory", "under_file"),
    ("db_dir_cannot_be_created", ["enqueue", "--", "true"], None, "cannot open database", "uncreatable"),
    ("db_in_read_only_dir", ["enqueue", "--", "true"], None, "read-only", "read_only_dir"),
    ("db_on_read_only_fs", ["enqueue", "--", "true"], None, "read-only", "read_only_fs"),
    ("db_of_random_bytes", ["status"], None, "not a queuectl database", "random_bytes"),
    ("db_of_another_program", ["enqueue", "--", "true"], None, "not a queuectl database", "foreign"),
    ("db_from_a_newer_queuectl", ["enqueue", "--", "true"], None, "newer", "newer"),
    ("db_on_a_full_disk_in_use", ["enqueue", "--", "echo %s" % ("x" * 60000)], None, "full", "full_disk"),
    ("db_on_a_full_disk_idle", ["enqueue", "--", "echo %s" % ("x" * 60000)], None, "full",
     "full_disk_idle"),
    ("read_of_a_missing_db", ["show", "nope"], None, "", "absent"),
    ("bad_busy_timeout_variable", ["enqueue", "--", "true"], None, "QUEUECTL_BUSY_TIMEOUT", "seeded"),
]


@sqlite_only
class BadInputTest(QueueTestCase):
    """Each bad input: a non-zero exit, one stderr line naming the problem, and nothing written."""

    @classmethod
    def setUpClass(cls):
        # One seeded database, made by the first case that needs it and copied for each case
        # (seeding takes a worker run).
        cls._template_dir = tempfile.mkdtemp(prefix="queuectl-test-template-")
        cls._template = None

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls._template_dir, True)

    def seed(self, db):
        """A queuectl database with a completed, a dead and a pending job."""
        cls = type(self)
        if cls._template is None:
            template = os.path.join(cls._template_dir, "q.db")
            for args in (("enqueue", "--id", "seed-done", "--", "true"),
                         ("enqueue", "--id", "seed-dead", "--max-retries", "0", "--", "exit 3"),
                         ("worker", "start", "--once"),
                         ("enqueue", "--id", "seed-pending", "--priority", "5", "--", "echo later"),
                         ("config", "set", "max_retries", "5")):
                self.script_text(*args, db=template, cwd=cls._template_dir)
            cls._template = template
        for suffix in ("", "-wal"):
            if os.path.exists(self._template + suffix):
                shutil.copyfile(self._template + suffix, db + suffix)

    def setup_db(self, kind):
        """Prepare the database of a case; returns (path, state function)."""
        db = self.db
        dump = lambda: self.db_dump(db)
        if kind == "seeded":
            self.seed(db)
        elif kind == "absent":
            db = os.path.join(self.tmp, "sub", "q.db")
            dump = lambda: (os.path.exists(db), os.path.exists(os.path.dirname(db)))
        elif kind == "directory":
            db = self.tmp
            dump = lambda: sorted(os.listdir(self.tmp))
        elif kind == "under_file":
            db = os.path.join(self.tmp, "afile", "q.db")
            with open(os.path.join(self.tmp, "afile"), "w") as f:
                f.write("not a directory\n")
            dump = lambda: sorted(os.listdir(self.tmp))
        elif kind == "uncreatable":
            db = "/proc/queuectl-test-%d/q.db" % os.getpid()
            dump = lambda: os.path.exists(os.path.dirname(db))
        elif kind == "read_only_dir":
            if os.geteuid() == 0:
                self.skipTest("root ignores directory permissions (see db_on_read_only_fs)")
            ro = os.path.join(self.tmp, "ro")
            os.mkdir(ro, 0o500)
            self.addCleanup(os.chmod, ro, 0o700)
            db = os.path.join(ro, "q.db")
            dump = lambda: sorted(os.listdir(ro))
        elif kind == "read_only_fs":
            mnt = mount_tmpfs(self)
            db = os.path.join(mnt, "q.db")
            self.seed(db)
            subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
            # (SQLite cannot open a WAL database on a read-only file system
            # without its -shm file: compare the bytes.)
            dump = lambda: (file_state(db), sorted(os.listdir(mnt)))
        elif kind == "random_bytes":
            with open(db, "wb") as f:
                f.write(random.Random(5).getrandbits(8 * 8192).to_bytes(8192, "big"))
            dump = lambda: file_state(db)
        elif kind == "foreign":
            conn = sqlite3.connect(db)
            conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
            conn.execute("INSERT INTO photos (path) VALUES ('a.jpg')")
            conn.commit()
            conn.close()
            dump = lambda: file_state(db)
        elif kind == "newer":
            self.seed(db)
            conn = sqlite3.connect(db)
            conn.execute("PRAGMA user_version = 99")
            conn.close()
        elif kind in ("full_disk", "full_disk_idle"):
            mnt = mount_tmpfs(self)
            db = os.path.join(mnt, "q.db")
            self.seed(db)
            if kind == "full_disk":
                # Another process has the database open (a worker would), so
                # the shared-memory file exists at its full size.
                holder = subprocess.Popen(
                    [sys.executable, "-c", "import sqlite3, sys, time\n"
                     "c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM jobs').fetchall()\n"
                     "print('open', flush=True); sys.stdin.read()", db],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self.addCleanup(lambda: (holder.kill(), holder.wait(timeout=10), holder.stdout.close(),
                                         holder.stdin.close()))
                self.assertEqual(holder.stdout.readline(), b"open\n")
            fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
            # With nothing holding it open, not even a reader can map the
            # database's -shm file on the full disk: compare the bytes.
            dump = (lambda: self.db_dump(db)) if kind == "full_disk" else (lambda: file_state(db)[:2])
        return db, dump

    def check_case(self, name, argv, data, words, kind):
        db, state = self.setup_db(kind)
        env = self.env(QUEUECTL_BUSY_TIMEOUT="abc") if name == "bad_busy_timeout_variable" else None
        stdin = data
        if "{file}" in argv:
            path = os.path.join(self.tmp, "input")
            with open(path, "wb") as f:
                f.write(data)
            argv = [path if a == "{file}" else a for a in argv]
            stdin = None
        before = state()
        code, out, err = self.script(*argv, db=db, stdin=stdin, env=env)
        text = err.decode("utf-8", "replace")
        self.assertNotIn("Traceback", text)
        self.assertNotEqual(code, 0, "accepted: " + text)
        self.assertEqual(out, b"", "stdout: %r" % out[:200])
        lines = text.splitlines()
        self.assertEqual(len(lines), 1, "stderr should be one line: %r" % text[:500])
        self.assertTrue(lines[0].startswith("queuectl: "), lines[0])
        self.assertIn(words.lower(), lines[0].lower())
        self.assertLess(len(lines[0]), 1000, "error line too long")
        self.assertEqual(state(), before, "the database changed")


def _make_bad_input_test(case):
    def test(self):
        self.check_case(*case)
    test.__doc__ = "bad input: %s" % case[0]
    return test


for _n, _case in enumerate(BAD_INPUTS, 1):
    setattr(BadInputTest, "test_%02d_%s" % (_n, _case[0]), _make_bad_input_test(_case))
del _n, _case


###############################################################################
# worker start, worker stop: real workers, signals, crashes, contention #######
###############################################################################

class TestWorkers(QueueTestCase):
    """Real workers run real commands: once each, by priority, with timeouts, retries and bounded output."""

    def test_once_drains_and_exits_zero(self):
        self.assertIn("started 1 worker", self.run_once())          # nothing to do: still exit 0
        ids = [self.add(self.ledger_command()) for _ in range(6)]
        log = self.run_once(count=2)
        self.assertEqual(sorted(self.ledger()), ids)
        for job_id in ids:
            self.assertEqual(self.job(job_id)["state"], "completed")
            self.assertRegex(log, r"%s claimed \(attempt 1/4\)" % job_id)
            self.assertRegex(log, r"%s completed in \d" % job_id)
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["workers"], [])

    def test_job_completes(self):
        job_id = self.add("echo hello; echo oops >&2")
        self.run_once()
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]), ("completed", 1, 0))
        [run] = job["runs"]
        self.assertEqual((run["exit_code"], run["outcome"]), (0, "exit 0"))
        code, out, err = self.run_cli_bytes("logs", job_id)
        self.assertEqual((code, out, err), (0, b"hello\n", b"oops\n"))
        self.assertEqual(self.expect_success("wait", job_id), "")

    def test_failing_job_retried_with_backoff_then_dead(self):
        self.expect_success("config", "set", "backoff-max", "0.3", err=None)   # min(2 ** k, 0.3): 0.3 s each
        job_id = self.add(self.ledger_command("run-$QUEUECTL_ATTEMPT") + "; exit 3", id="flaky",
                          max_retries=2)
        pool = self.start_pool()
        job = self.wait_state(job_id, "dead")
        self.assertEqual((job["attempts"], job["exit_code"], job["outcome"]), (3, 3, "exit 3"))
        runs = job["runs"]
        self.assertEqual([r["attempt"] for r in runs], [1, 2, 3])
        self.assertEqual([(r["exit_code"], r["outcome"]) for r in runs], [(3, "exit 3")] * 3)
        for before, after in zip(runs, runs[1:]):
            gap = iso_to_ts(after["started_at"]) - iso_to_ts(before["finished_at"])
            self.assertGreaterEqual(gap, 0.29, "retried before its backoff passed")
        self.assertEqual(self.ledger(), ["run-1", "run-2", "run-3"])
        self.assertEqual(self.dlq_ids(), ["flaky"])
        code, _, _ = self.run_cli("wait", job_id)
        self.assertEqual(code, 3)
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 0)
        log = self.pool_log(pool)
        self.assertEqual(len(re.findall(r"flaky exit 3, retry at \d\d:\d\d:\d\d", log)), 2, log)
        self.assertEqual(len(re.findall(r"flaky exit 3, dead", log)), 1, log)

    def test_worker_count_is_bounded(self):
        """`--count 1000000` used to fork until the file descriptors ran out.
        The cases run with a limit of 64 open files, so that the old code
        fails after a few dozen workers instead of thousands."""
        self.init_db()
        cpus = os.cpu_count() or 1
        limit = max(256, 32 * cpus)
        for count in ("1000000", str(limit + 1)):
            code, out, err = self.script("worker", "start", "--once", "--count", count, nofile=(64, 64))
            self.assertEqual((code, out, err.decode()), (2, b"", (
                "queuectl: error: --count %s is more than %d workers (32 per CPU, at least 256; this machine has "
                "%d CPU%s) and each is a process; add --force if you mean it\n"
                % (count, limit, cpus, "" if cpus == 1 else "s"))))
        code, out, err = self.script("worker", "start", "--once", "--count", "300", "--force", nofile=(64, 64))
        self.assertEqual((code, out, err.decode()), (1, b"", (
            "queuectl: error: --count 300 needs about 632 open files in the supervisor, more than its limit "
            "of 64 (ulimit -Hn); raise the limit or start fewer workers\n")))
        # Under the hard limit, the soft one is raised: 40 workers with a soft limit of 32.
        self.add(self.ledger_command())
        code, out, err = self.script("worker", "start", "--once", "--count", "40", nofile=(32, 4096))
        self.assertEqual((code, out), (0, b""), err.decode())
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(len(self.ledger()), 1)

    def test_three_workers_run_three_sleeps_in_parallel(self):
        ids = [self.add("sleep 1") for _ in range(3)]
        started = time.monotonic()
        self.run_once(count=3)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 2.5, "3 x sleep 1 on 3 workers took %.2fs" % elapsed)
        runs = [self.job(i)["runs"][0] for i in ids]
        self.assertEqual({self.job(i)["state"] for i in ids}, {"completed"})
        first_end = min(iso_to_ts(r["finished_at"]) for r in runs)
        for run in runs:
            self.assertLess(iso_to_ts(run["started_at"]), first_end, "the runs did not overlap")
        self.assertEqual(len({r["worker"] for r in runs}), 3)

    def test_data_survives_restart(self):
        code, out, err = self.script("enqueue", '{"id": "kept", "command": "echo kept > kept.txt"}')
        self.assertEqual((code, out, err), (0, b"kept\n", b""))
        code, out, err = self.script("list", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual([(j["id"], j["state"]) for j in json.loads(out.decode())], [("kept", "pending")])
        self.run_once()
        code, out, err = self.script("show", "kept", "--json")
        self.assertEqual(json.loads(out.decode())["state"], "completed")
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "kept.txt")))

    def test_invalid_command_fails_gracefully(self):
        job_id = self.add("nonexistent_cmd_xyz --flag", max_retries=0)
        after = self.add("echo still alive")
        log = self.run_once()
        job = self.job(job_id)
        self.assertEqual((job["state"], job["exit_code"]), ("dead", 127))
        self.assertIn("not found", job["runs"][0]["outcome"])
        code, out, err = self.run_cli_bytes("logs", job_id)
        self.assertIn(b"not found", err)
        self.assertIn("not found", log)
        self.assertEqual(self.job(after)["state"], "completed")
        code, _, err = self.run_cli("wait", job_id)
        self.assertEqual((code, err), (127, "queuectl: job %s is dead (exit 127)\n" % job_id))

    def test_job_killed_by_a_signal_fails(self):
        job_id = self.add("echo before; kill -KILL $$; echo after", max_retries=0)
        self.run_once()
        job = self.job(job_id)
        self.assertEqual(job["state"], "dead")
        self.assertIn("SIGKILL", job["runs"][0]["outcome"])
        self.assertEqual(self.expect_success("logs", job_id), "before\n")
        code, _, _ = self.run_cli("wait", job_id)
        self.assertNotEqual(code, 0)

    def test_job_whose_directory_is_gone_fails_gracefully(self):
        gone = os.path.join(self.tmp, "gone")
        os.mkdir(gone)
        os.chdir(gone)
        job_id = self.add("true", max_retries=0)
        os.chdir(self.tmp)
        os.rmdir(gone)
        after = self.add("true")
        self.run_once()
        job = self.job(job_id)
        self.assertEqual(job["state"], "dead")
        self.assertTrue(job["runs"][0]["outcome"] and job["runs"][0]["outcome"] != "exit 0")
        self.assertEqual(self.job(after)["state"], "completed")

    def test_200_jobs_on_4_workers_run_exactly_once(self):
        path = os.path.join(self.tmp, "jobs.jsonl")
        with open(path, "w") as f:
            for i in range(200):
                f.write(json.dumps({"id": "j%03d" % i, "command": self.ledger_command()}) + "\n")
        ids = self.expect_success("enqueue", "--file", path).split()
        self.assertEqual(len(ids), 200)
        self.run_once(count=4)
        ledger = self.ledger()
        self.assertEqual(len(ledger), 200, "each job must run exactly once")
        self.assertEqual(sorted(ledger), sorted(ids))
        counts = json.loads(self.expect_success("status", "--json"))["counts"]
        self.assertEqual(counts, {"pending": 0, "processing": 0, "completed": 200, "failed": 0, "dead": 0})
        self.assertEqual({j["attempts"] for j in self.jobs()}, {1})
        workers = {self.job(i)["runs"][0]["worker"] for i in ids[::10]}
        self.assertGreater(len(workers), 1, "only one worker did any work")

    def test_priority_order_on_one_worker(self):
        for job_id, priority in (("a", 0), ("b", 5), ("c", -1), ("d", 10), ("e", 5), ("f", 0)):
            self.add(self.ledger_command(), id=job_id, priority=priority)
        self.run_once(count=1)
        self.assertEqual(self.ledger(), ["d", "b", "e", "a", "f", "c"])

    def test_future_jobs_not_run_early(self):
        soon_at = time.time() + 1.5
        soon_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(soon_at)) + ".%03dZ" % (soon_at % 1 * 1000)
        now = self.add(self.ledger_command(), id="now")
        delayed = self.add(self.ledger_command(), id="delayed", delay=1.5)
        at = self.add(self.ledger_command(), id="at", run_at=soon_iso)
        far = self.add(self.ledger_command(), id="far", run_at="2099-01-01T00:00:00Z")
        self.run_once()
        finished = time.time()
        self.assertEqual(self.job(now)["state"], "completed")
        not_due = [far] + ([delayed, at] if finished < soon_at - 0.05 else [])   # unless very slow
        for job_id in not_due:
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"], job["runs"]), ("pending", 0, []), job_id)
        pool = self.start_pool()
        for job_id in (delayed, at):
            job = self.wait_state(job_id, "completed", timeout=15)
            self.assertGreaterEqual(iso_to_ts(job["runs"][0]["started_at"]), iso_to_ts(job["run_at"]) - 0.001)
        self.assertEqual(sorted(self.ledger()), ["at", "delayed", "now"])
        self.assertEqual(self.job(far)["state"], "pending")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_an_idle_worker_wakes_when_a_delayed_job_falls_due(self):
        """Not at its next safety check (IDLE_RECHECK_SECONDS, 2 s): each job starts within 0.5 s of
        its due time (a check at a random point of 2 s would fail this for all three 1 time in 64)."""
        pool = self.start_pool()
        self.wait_pool_ready(pool, 1)
        ids = [self.add("true", delay=delay) for delay in (1.0, 1.7, 2.4)]
        for job_id in ids:
            job = self.wait_state(job_id, "completed")
            late = iso_to_ts(job["runs"][0]["started_at"]) - iso_to_ts(job["run_at"])
            self.assertGreaterEqual(late, -0.001, job_id)
            self.assertLess(late, 0.5, job_id)
        self.expect_success("worker", "stop", err=None)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_timeout_kills_the_job_and_its_children(self):
        m1, m2 = self.marker(), self.marker()
        # Children in the job's process group (one with an empty environment, so only the group
        # kill can find it), and one that left the group (setsid) but carries the job's environment.
        in_group = self.add("env -i sleep %s & wait" % m1, timeout=1, max_retries=0)
        escaped = self.add("setsid sleep %s & sleep %s; echo never" % (m2, m2), timeout=1, max_retries=0)
        started = time.monotonic()
        self.run_once(count=2)
        self.assertLess(time.monotonic() - started, 1 + queuectl.KILL_GRACE_SECONDS)
        for job_id in (in_group, escaped):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["outcome"], job["runs"][0]["outcome"]),
                             ("dead", "timeout", "timeout"))
            self.assertEqual(self.expect_success("logs", job_id), "")
        for m in (m1, m2):
            self.wait_until(lambda: not processes_running(m), 2, lambda: "the job's children to be gone: %s"
                            % processes_running(m))

    def test_timeout_kills_a_job_that_ignores_sigterm(self):
        m = self.marker()
        job_id = self.add("trap '' TERM; sleep %s; echo survived" % m, timeout=0.5, max_retries=0)
        self.run_once()
        job = self.job(job_id)
        self.assertEqual((job["state"], job["outcome"]), ("dead", "timeout"))
        self.wait_until(lambda: not processes_running(m), 2, "the job to be gone")
        self.assertNotIn("survived", self.expect_success("logs", job_id))

    def test_non_utf8_output_round_trips(self):
        job_id = self.add(r"printf '\377\376abc\n\000end'; printf '\200\201' >&2")
        self.run_once()
        code, out, err = self.run_cli_bytes("logs", job_id)
        self.assertEqual((code, out, err), (0, b"\xff\xfeabc\n\x00end", b"\x80\x81"))
        code, out, err = self.script("logs", job_id)
        self.assertEqual((code, out, err), (0, b"\xff\xfeabc\n\x00end", b"\x80\x81"))
        self.expect_success("show", job_id)
        self.expect_success("list")

    def latin1_env(self):
        """The environment of an ISO-8859-1 locale, built with localedef into
        our temp dir (LOCPATH); skips (fails under CI) where that cannot be done."""
        locales = os.path.join(self.tmp, "locales")
        name = "en_US.ISO-8859-1"
        os.mkdir(locales)
        if not shutil.which("localedef"):
            skip_or_fail(self, "localedef is not installed (needed to build an ISO-8859-1 locale)")
        r = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", os.path.join(locales, name)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        env = self.env(LOCPATH=locales, LC_ALL=name, LANG=name)
        for var in ("PYTHONUTF8", "PYTHONIOENCODING", "PYTHONCOERCECLOCALE"):
            env.pop(var, None)
        probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"],
                               env=env, stdout=subprocess.PIPE)
        if r.returncode != 0 or probe.stdout.strip() != b"iso8859-1":
            skip_or_fail(self, "cannot build an ISO-8859-1 locale with localedef: %s %s"
                         % (r.stdout.decode(errors="replace").strip()[-200:], probe.stdout))
        return env

    def test_command_the_locale_cannot_encode(self):
        """A worker in an ISO-8859-1 locale runs `echo ✓` (passed as UTF-8)
        and `echo é` (as the locale encodes it) and keeps going; the read
        commands print what the locale can and escape the rest."""
        env = self.latin1_env()
        tick = self.add("echo \u2713", id="tick", max_retries=0)
        eacute = self.add("echo \u00e9", id="eacute", max_retries=0)
        code, out, err = self.script("worker", "start", "--once", env=env)
        log = err.decode("utf-8", "replace")
        self.assertEqual((code, out), (0, b""), log)
        self.assertNotIn("Traceback", log)
        self.assertEqual([(j["id"], j["state"]) for j in self.jobs()], [(tick, "completed"), (eacute, "completed")])
        self.assertEqual(self.run_cli_bytes("logs", tick), (0, "\u2713\n".encode("utf-8"), b""))
        self.assertEqual(self.run_cli_bytes("logs", eacute), (0, b"\xe9\n", b""))
        for args in (["list"], ["show", tick], ["dlq", "list"], ["status"]):
            code, out, err = self.script(*args, env=env)
            self.assertEqual(code, 0, (args, err))
            self.assertNotIn(b"Traceback", err, args)
        code, out, err = self.script("list", env=env)
        self.assertIn(b"echo \\u2713\n", out)
        self.assertIn(b"echo \xe9\n", out)
        code, out, err = self.script("list", "--json", env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual([j["command"] for j in json.loads(out.decode("latin-1"))], ["echo \u2713", "echo \u00e9"])

    def test_multi_megabyte_output_is_bounded(self):
        size = 5 * 1000 * 1000
        job_id = self.add("printf START; head -c %d /dev/zero | tr '\\000' x; printf END; "
                          "head -c %d /dev/zero >&2; echo done >> %s"
                          % (size, size, shlex.quote(os.path.join(self.tmp, "ledger"))))
        self.run_once(timeout=60)
        self.assertEqual(self.job(job_id)["state"], "completed")
        self.assertEqual(self.ledger(), ["done"])
        code, out, err = self.run_cli_bytes("logs", job_id)
        self.assertEqual(code, 0)
        total = len("START") + size + len("END")
        self.assertTrue(out.startswith(b"STARTxxx") and out.endswith(b"xxxEND"), (out[:20], out[-20:]))
        self.assertLess(len(out), 2 * 1024 * 1024 + 200, "stdout is not bounded")
        m = re.search(rb"(\d+) bytes cut", out)
        self.assertIsNotNone(m, "no cut marker")
        kept = out.count(b"x") + len("START") + len("END")
        self.assertEqual(kept + int(m.group(1)), total, "the marker does not say how much was cut")
        self.assertLess(len(err), 2 * 1024 * 1024 + 200, "stderr is not bounded")
        m = re.search(rb"(\d+) bytes cut", err)
        self.assertIsNotNone(m)
        self.assertEqual(err.count(b"\0") + int(m.group(1)), size)
        run = self.job(job_id)["runs"][0]
        self.assertEqual((run["stdout_bytes"], run["stderr_bytes"]), (len(out), len(err)))

    def test_job_environment_cwd_and_stdin(self):
        workdir = os.path.join(self.tmp, "work dir")
        os.mkdir(workdir)
        os.chdir(workdir)
        job_id = self.add('pwd > where.txt; echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT" > env.txt; '
                          'readlink /proc/self/fd/0 > stdin.txt; cat > stdin-data.txt', timeout=10)
        os.chdir(self.tmp)
        # The pool's own stdin is a pipe that stays open: a job reading it would hang.
        pool = self.start_pool("--once", stdin=subprocess.PIPE)
        self.assertEqual(self.wait_pool(pool), 0)
        self.assertEqual(self.job(job_id)["state"], "completed")

        def read(name):
            with open(os.path.join(workdir, name)) as f:
                return f.read()

        self.assertEqual(read("where.txt"), workdir + "\n")
        self.assertEqual(read("env.txt"), "%s 1\n" % job_id)
        self.assertEqual(read("stdin.txt"), "/dev/null\n")
        self.assertEqual(read("stdin-data.txt"), "")

    def test_wait_blocks_until_the_job_is_done(self):
        job_id = self.add("sleep 0.3")
        waiter = self.spawn("wait", job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(waiter.wait)
        self.addCleanup(waiter.kill)
        self.wait_until(lambda: self.has_db_open(waiter.pid), 10, "wait to open the database")
        time.sleep(0.2)       # not a wait for a result: give `wait` a chance to return early, wrongly
        self.assertIsNone(waiter.poll(), "wait returned while the job was pending")
        self.run_once()
        out, err = waiter.communicate(timeout=DEADLINE)
        self.assertEqual((waiter.returncode, out, err), (0, b"", b""))


class TestWorkerLifecycle(QueueTestCase):
    """Real pools stop, crash and are killed without losing a job or running it twice."""

    def worker_pid(self, job_id):
        """The pid of the worker running `job_id`, from `status --json`."""
        status = json.loads(self.expect_success("status", "--json"))
        [worker] = [w for w in status["workers"] if w["job"] == job_id]
        return worker["pid"]

    def test_worker_stop_from_another_process(self):
        a = self.add("sleep 1; " + self.ledger_command(), id="a", priority=1)
        b = self.add(self.ledger_command(), id="b")
        pool = self.start_pool()
        self.wait_state(a, "processing")
        # While the pool runs, status lists its worker and the job it runs.
        status = json.loads(self.expect_success("status", "--json"))
        [worker] = status["workers"]
        self.assertEqual(worker["job"], a)
        self.assertNotEqual(worker["pid"], pool.pid)
        for field in ("pid", "started_at", "heartbeat_at"):
            self.assertIn(field, worker)
        self.assertEqual(status["counts"]["processing"], 1)
        running = self.job(a)
        self.assertEqual((running["state"], running["attempts"]), ("processing", 1))
        run = running["runs"][0]
        self.assertEqual((run["outcome"], run["finished_at"]), ("running", None))
        code, out, err = self.run_cli("logs", a)
        self.assertEqual((code, out), (0, ""))
        self.assertIn("running", err)
        text = self.expect_success("status")
        self.assertRegex(text, r"(?m)^%d\s.*\s%s\s" % (worker["pid"], a))
        code, out, err = self.script("worker", "stop", "--timeout", "20")
        self.assertEqual((code, out), (0, b""), err)
        self.assertEqual(err, b"queuectl: asked 1 worker to stop; waiting for running jobs to finish\n"
                              b"queuectl: stopped 1 worker\n")
        self.assertEqual(self.wait_pool(pool), 0)
        self.assertEqual(self.job(a)["state"], "completed")
        self.assertEqual(self.ledger(), ["a"])
        job = self.job(b)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0),
                         "a worker asked to stop started another job")
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["workers"], [])

    def test_worker_stop_counts_idle_workers_that_leave_at_once(self):
        # Woken by the request, idle workers exit before `worker stop` looks again; it said
        # "asked 1 worker" or "no workers running" of three that were running when it asked.
        for _ in range(3):
            pool = self.start_pool("--count", "3")
            self.wait_pool_ready(pool, 3)
            code, out, err = self.script("worker", "stop", "--timeout", "20")
            self.assertEqual((code, out), (0, b""), err)
            self.assertEqual(err, b"queuectl: asked 3 workers to stop; waiting for running jobs to finish\n"
                                  b"queuectl: stopped 3 workers\n")
            self.assertEqual(self.wait_pool(pool), 0)

    def test_worker_stop_times_out(self):
        m = self.marker()
        job_id = self.add("sleep %s" % m)
        pool = self.start_pool()
        self.wait_state(job_id, "processing")
        pid = self.worker_pid(job_id)
        started = time.monotonic()
        code, out, err = self.script("worker", "stop", "--timeout", "0.5")
        self.assertEqual((code, out), (124, b""))
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(err.decode().splitlines()[-1],
                         "queuectl: timed out: 1 worker still running (pid %d)" % pid)
        self.assertIsNone(pool.poll())
        [worker] = json.loads(self.expect_success("status", "--json"))["workers"]
        self.assertEqual((worker["pid"], worker["job"], worker["stopping"]), (pid, job_id, True))

    def test_sigterm_is_graceful(self):
        a = self.add("sleep 1; " + self.ledger_command(), id="a", priority=1)
        b = self.add(self.ledger_command(), id="b")
        pool = self.start_pool("--count", "1")
        self.wait_state(a, "processing")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 0)
        self.assertEqual(self.job(a)["state"], "completed")
        self.assertEqual(self.ledger(), ["a"])
        self.assertEqual(self.job(b)["state"], "pending")
        self.assertIn("stopping", self.pool_log(pool))

    def test_second_sigterm_kills_and_requeues(self):
        m = self.marker()
        job_id = self.add("sleep %s; " % m + self.ledger_command(), max_retries=0)
        pool = self.start_pool()
        self.wait_state(job_id, "processing")
        os.kill(pool.pid, signal.SIGTERM)
        self.wait_until(lambda: "stopping" in self.pool_log(pool), 10, "the pool to log that it is stopping")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 130)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0), "the attempt was used up")
        self.assertEqual(job["runs"][-1]["outcome"], "interrupted")
        self.wait_until(lambda: not processes_running(m), 2, "the job's process group to be killed")
        self.assertEqual(self.ledger(), [])

    def test_sigint_like_ctrl_c_is_graceful(self):
        job_id = self.add("sleep 0.5; " + self.ledger_command())
        pool = self.start_pool("--count", "2")
        self.wait_state(job_id, "processing")
        os.killpg(pool.pid, signal.SIGINT)       # Ctrl-C: the terminal signals its foreground group
        self.assertEqual(self.wait_pool(pool), 0)
        self.assertEqual(self.job(job_id)["state"], "completed")

    def start_a_job_that_hangs_once(self):
        """A pool running a job whose first attempt hangs in `sleep MARKER` and whose second one
        logs attempt-2; returns (job id, marker, pool)."""
        self.expect_success("config", "set", "backoff-max", "0", err=None)
        m = self.marker()
        job_id = self.add('if [ "$QUEUECTL_ATTEMPT" = 1 ]; then sleep %s; fi; ' % m
                          + self.ledger_command("attempt-$QUEUECTL_ATTEMPT"))
        pool = self.start_pool()
        self.wait_state(job_id, "processing")
        self.wait_until(lambda: processes_running(m), 10, "the job's command to start")
        return job_id, m, pool

    def assert_ran_again(self, job, m):
        """The first run was lost with its worker, its command killed; the second one completed."""
        self.assertEqual([r["outcome"] for r in job["runs"]], ["worker lost", "exit 0"])
        self.assertEqual(self.ledger(), ["attempt-2"])
        self.wait_until(lambda: not processes_running(m), 2, "the lost run's command to be killed")

    def test_sigkilled_worker_does_not_leave_its_job_stuck(self):
        job_id, m, pool = self.start_a_job_that_hangs_once()
        os.kill(self.worker_pid(job_id), signal.SIGKILL)
        job = self.wait_state(job_id, "completed")
        self.assertEqual(job["attempts"], 2)
        self.assert_ran_again(job, m)
        self.assertIsNone(pool.poll(), "the pool died with its worker")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_killed_pool_job_reclaimed_by_worker_once(self):
        job_id, m, pool = self.start_a_job_that_hangs_once()
        kill_session(pool.pid)       # the whole pool: a reboot or the OOM killer
        pool.wait(DEADLINE)
        self.assertEqual(self.job(job_id)["state"], "processing")
        started = time.monotonic()
        self.run_once()                          # cron: must not wait for the lease to expire
        self.assertLess(time.monotonic() - started, queuectl.LEASE_SECONDS / 2)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 2))
        self.assert_ran_again(job, m)

    def test_cancel_survives_a_lost_worker(self):
        m = self.marker()
        job_id = self.add("sleep %s; " % m + self.ledger_command(), max_retries=3)
        pool = self.start_pool()
        self.wait_state(job_id, "processing")
        self.wait_until(lambda: processes_running(m), 10, "the job's command to start")
        self.expect_success("cancel", job_id, err=None)
        kill_session(pool.pid)       # the worker dies before it acts on the cancel
        pool.wait(DEADLINE)
        self.run_once()
        job = self.job(job_id)
        self.assertEqual((job["state"], job["outcome"], job["attempts"]), ("dead", "cancelled", 1))
        self.wait_until(lambda: not processes_running(m), 2, "the cancelled job to be killed")
        self.assertEqual(self.ledger(), [])

    def test_cancel_running_job(self):
        m = self.marker()
        job_id = self.add("sleep %s; " % m + self.ledger_command())
        pool = self.start_pool()
        self.wait_state(job_id, "processing")
        self.expect_success("cancel", job_id, err="queuectl: job %s is running: its worker will kill it "
                                                  "and move it to the DLQ\n" % job_id)
        job = self.wait_state(job_id, "dead", timeout=15)
        self.assertEqual(job["outcome"], "cancelled")
        self.wait_until(lambda: not processes_running(m), 2, "the cancelled job to be killed")
        self.assertEqual(self.ledger(), [])
        after = self.add("true")
        self.wait_state(after, "completed")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool), 0)


@sqlite_only
class TestWakeUp(QueueTestCase):
    """Idle SQLite workers are woken by commits through the FIFO beside the database, and work without it."""

    def idle_workers(self, proc, count):
        """Wait until `count` workers of the pool hold the wake FIFO open (they are idle, waiting)."""
        fifo = os.path.realpath(self.db) + queuectl.WAKE_SUFFIX

        def waiting():
            return len([pid for pid in pids_of_session(proc.pid) if self.has_db_open(pid, fifo)]) == count
        self.wait_until(waiting, message="%d idle workers waiting on the FIFO" % count)
        return fifo

    def test_a_commit_that_makes_work_claimable_nudges_a_waiting_worker(self):
        import select
        self.init_db()
        with queuectl.Store(self.db) as store:
            waker = store.waker()
            self.addCleanup(waker.close)
            self.assertIsNotNone(waker.fileno())
            self.assertTrue(stat.S_ISFIFO(os.lstat(self.db + queuectl.WAKE_SUFFIX).st_mode))
            self.assertEqual(stat.S_IMODE(os.lstat(self.db + queuectl.WAKE_SUFFIX).st_mode), 0o600)

            def nudged():
                ready = select.select([waker], [], [], 0)[0]
                waker.drain()
                return bool(ready)
            # Each of these makes work claimable (or asks a stop): a nudge.
            self.add("true")
            self.assertTrue(nudged(), "enqueue")
            self.expect_success("queue", "pause", "q2", err=None)
            nudged()
            self.expect_success("queue", "resume", "q2", err=None)
            self.assertTrue(nudged(), "queue resume")
            self.expect_success("worker", "stop", err=None)
            self.assertTrue(nudged(), "worker stop")
            # A job for later: so that a worker learns when to wake up.
            self.add("true", delay="1h")
            self.assertTrue(nudged(), "a delayed job")
            # ... and a read does not.
            self.expect_success("status")
            self.assertFalse(nudged(), "status")
            # A worker that finishes a run nudges too (it may free a slot of a limited queue).
            job = store.claim("w", queues=None)
            self.assertIsNotNone(job)
            nudged()
            store.finish(job["id"], job["run"], "w", queuectl.RunResult(0, "exit 0"))
            self.assertTrue(nudged(), "finish")

    def test_enqueue_with_no_worker_waiting_neither_blocks_nor_leaves_a_file(self):
        self.add("true")
        self.assertFalse(os.path.lexists(self.db + queuectl.WAKE_SUFFIX))
        # A FIFO that no worker holds open (its worker was SIGKILLed): the
        # writer's open fails at once (ENXIO) instead of blocking.
        os.mkfifo(self.db + queuectl.WAKE_SUFFIX, 0o600)
        code, _, err = self.script("enqueue", "--", "true", timeout=10)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.expect_success("status", "--json").count('"pending": 2'), 1)

    def test_a_lost_nudge_is_caught_by_the_safety_poll(self):
        self.init_db()
        pool = self.start_pool("--count", "2")
        fifo = self.idle_workers(pool, 2)
        # The FIFO goes away under the idle workers: no nudge can reach them.
        os.unlink(fifo)
        job_id = self.add("true")
        self.wait_state(job_id, "completed")
        self.assertNotIn("Traceback", self.pool_log(pool))

    def test_a_worker_that_cannot_be_nudged_polls(self):
        # Something that is not a FIFO where the FIFO goes: the worker polls
        # instead, and no commit writes into it.
        self.init_db()
        path = self.db + queuectl.WAKE_SUFFIX
        with open(path, "wb") as f:
            f.write(b"keep")
        os.chmod(path, 0o600)
        pool = self.start_pool()
        self.wait_pool_ready(pool, 1)
        ids = [self.add("true") for _ in range(3)]
        for job_id in ids:
            self.wait_state(job_id, "completed")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"keep")
        self.expect_success("worker", "stop", err=None)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_the_fifo_left_by_a_killed_pool_serves_the_next_one(self):
        self.init_db()
        pool = self.start_pool()
        fifo = self.idle_workers(pool, 1)
        kill_session(pool.pid)
        pool.wait(10)
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))
        self.add("true")        # no reader now: must not block
        pool = self.start_pool()
        self.idle_workers(pool, 1)      # the first job done, waiting again on the old FIFO
        job_id = self.add("true")
        self.wait_state(job_id, "completed")

    def test_sixteen_enqueuers_and_four_idle_workers_lose_no_job(self):
        self.init_db()
        pool = self.start_pool("--count", "4")
        self.idle_workers(pool, 4)
        procs = [self.spawn("enqueue", "--file", "-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE) for _ in range(16)]
        for proc in procs:
            _, err = proc.communicate(b'{"command": "true"}\n' * 5, timeout=DEADLINE)
            self.assertEqual(proc.returncode, 0, err)
        self.wait_until(lambda: json.loads(self.expect_success("status", "--json"))["counts"]["completed"] == 80,
                        message="80 jobs completed")
        self.expect_success("worker", "stop", err=None)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_a_signal_ends_the_idle_wait(self):
        # SIGTERM to the supervisor: its idle workers stop at once, not at
        # their next safety poll (nothing reads the database while they wait).
        self.init_db()
        pool = self.start_pool("--count", "2")
        self.idle_workers(pool, 2)
        pool.send_signal(signal.SIGTERM)
        self.assertEqual(self.wait_pool(pool, timeout=10), 0)


class TestWorkerStop(unittest.TestCase):
    """A worker's stop request only ever escalates, whatever order the signals come in."""

    def test_stop_only_goes_up(self):
        # Signal handlers set the flags; one running after (or inside) another
        # must not undo a hard stop.
        w = queuectl.Worker(os.path.join(tempfile.gettempdir(), "never-opened.db"))
        self.assertFalse(w.stopping or w.stopping_hard)
        w._on_supervisor_stop_hard(signal.SIGUSR2, None)
        w._on_supervisor_stop(signal.SIGUSR1, None)
        w._on_sigterm(signal.SIGTERM, None)
        self.assertTrue(w.stopping and w.stopping_hard)
        # SIGTERM to a worker alone: the first is graceful, the second hard.
        w = queuectl.Worker(os.path.join(tempfile.gettempdir(), "never-opened.db"))
        w._on_sigterm(signal.SIGTERM, None)
        self.assertEqual((w.stopping, w.stopping_hard, w.stop_by_sigterm), (True, False, True))
        w._on_sigterm(signal.SIGTERM, None)
        self.assertTrue(w.stopping_hard)


class ShutdownTest(QueueTestCase):
    """Graceful and hard stops, Ctrl-C/Ctrl-Z, systemd's KillMode=mixed: no job lost, no grandchild left."""

    def starts(self):
        return [line.split()[1] for line in self.ledger_lines() if line.startswith("start ")]

    def ends(self):
        return [line.split()[1] for line in self.ledger_lines() if line.startswith("end ")]

    def start_a_grandchild_that_hangs_once(self, count):
        """A pool of `count` running a job whose first attempt hangs in a grandchild (found by
        the returned marker); the next attempt succeeds at once. Returns (job, marker, pool)."""
        self.script_text("config", "set", "backoff_max", "0")
        marker = self.marker()
        job = self.add(self.ledger_job(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then sleep %s & sleep 30; fi' % marker))
        pool = self.start_pool(count=count)
        self.wait_until(lambda: self.starts() and processes_running(marker), 15, "the job to start")
        return job, marker, pool

    def assert_lost_then_completed(self, job):
        """The job's first run was lost with its worker and the second one completed."""
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("completed", 2))
        self.assertEqual([r["outcome"] for r in row["runs"]], ["worker lost", "exit 0"])

    def test_supervisor_killed_alone_workers_finish_and_leave(self):
        # SIGKILL of the supervisor only: its worker notices (its parent
        # changed), finishes the job at hand, claims nothing more and exits.
        a = self.add(self.ledger_job("sleep 1"))
        b = self.add(self.ledger_job("true"))
        pool = self.start_pool(count=1)
        self.wait_until(lambda: self.starts() == [a], 15, "the first job to start")
        worker_pids = children(pool.pid)
        self.assertEqual(len(worker_pids), 1)
        os.kill(pool.pid, signal.SIGKILL)
        pool.wait(timeout=10)
        self.wait_until(lambda: proc_state(worker_pids[0]) in (b"Z", b"?"), 15, "the orphaned worker to exit")
        jobs = self.jobs_by_id()
        self.assertEqual((jobs[a]["state"], jobs[a]["attempts"]), ("completed", 1))
        self.assertEqual((jobs[b]["state"], jobs[b]["attempts"]), ("pending", 0))
        self.assertIn("supervisor gone; stopping", self.pool_log(pool))

    def sigterm_a_pool_running_two_of_three(self, seconds):
        """Two jobs of `seconds` running on a pool of two and a third waiting, when the pool gets
        a SIGTERM; returns (a, b, c, pool)."""
        a = self.add(self.ledger_job("sleep %s" % seconds))
        b = self.add(self.ledger_job("sleep %s" % seconds))
        c = self.add(self.ledger_job("true"))
        pool = self.start_pool(count=2)
        self.wait_until(lambda: len(self.starts()) == 2, 15, "two jobs to start")
        os.kill(pool.pid, signal.SIGTERM)
        return a, b, c, pool

    def test_graceful_stop_finishes_running_jobs(self):
        a, b, c, pool = self.sigterm_a_pool_running_two_of_three(1.5)
        self.assertEqual(pool.wait(timeout=20), 0)
        jobs = self.jobs_by_id()
        self.assertEqual((jobs[a]["state"], jobs[a]["attempts"]), ("completed", 1))
        self.assertEqual((jobs[b]["state"], jobs[b]["attempts"]), ("completed", 1))
        self.assertEqual((jobs[c]["state"], jobs[c]["attempts"]), ("pending", 0))
        self.assertEqual(sorted(self.ends()), sorted([a, b]))
        self.assertEqual(pids_of_db(self.db), [])

    def test_hard_stop_puts_jobs_back_without_an_attempt(self):
        marker = self.marker()
        job = self.add(self.ledger_job("sleep %s & sleep 30" % marker), max_retries=0)
        pool = self.start_pool(count=1)
        self.wait_until(lambda: self.starts() and processes_running(marker), 15, "the job to start")
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(pool.pid, signal.SIGTERM)
        t0 = time.monotonic()
        self.assertEqual(pool.wait(timeout=20), 130)
        self.assertLess(time.monotonic() - t0, 5.0, "a hard stop should not wait for the job")
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))
        self.assertEqual([r["outcome"] for r in self.job(job)["runs"]], ["interrupted"])
        self.wait_until(lambda: not processes_running(marker), 5, "the grandchild to be gone")
        self.assertEqual(self.ends(), [])

    def test_ctrl_c_once_finishes_twice_puts_back(self):
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group
        # (the supervisor and its workers; jobs run in sessions of their own).
        a = self.add(self.ledger_job("sleep 1"))
        pool = self.start_pool(count=1)
        self.wait_until(lambda: self.starts(), 15, "the job to start")
        os.killpg(pool.pid, signal.SIGINT)
        self.assertEqual(pool.wait(timeout=20), 0)
        self.assertEqual((self.job(a)["state"], self.ends()), ("completed", [a]))

        b = self.add(self.ledger_job("sleep 30"))
        pool = self.start_pool(count=1)
        self.wait_until(lambda: len(self.starts()) == 2, 15, "the second job to start")
        os.killpg(pool.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(pool.pid, signal.SIGINT)
        self.assertEqual(pool.wait(timeout=20), 130)
        row = self.job(b)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))
        self.assertEqual(pids_of_db(self.db), [])

    def test_ctrl_c_never_kills_a_job_as_it_starts(self):
        # Ctrl-C while workers start jobs as fast as they can: a job caught
        # between its fork and its setsid() must not get the terminal's SIGINT
        # (CPython's vfork path resets handlers before setsid). It used to,
        # in about 4 Ctrl-Cs out of 10 here.
        batch = os.path.join(self.tmp, "batch.jsonl")
        with open(batch, "w") as f:
            f.write('{"command": "true"}\n' * 3000)
        for _ in range(8):
            self.script_text("enqueue", "--file", batch)
            runs = self.query_one("SELECT count(*) FROM runs")
            pool = self.start_pool(count=2)
            self.wait_until(lambda: self.query_one("SELECT count(*) FROM runs") >= runs + 50, 15, "jobs to run")
            os.killpg(pool.pid, signal.SIGINT)
            self.assertEqual(pool.wait(timeout=30), 0, self.pool_log(pool))
        # 'interrupted': claimed with the last result as the stop came, given back unstarted.
        self.assertEqual(self.query_one("SELECT count(*) FROM runs WHERE outcome NOT IN "
                                           "('exit 0', 'interrupted')"), 0)
        self.assertEqual(self.query_one("SELECT count(*) FROM jobs WHERE state NOT IN "
                                           "('pending', 'completed')"), 0)

    def _gated_job(self):
        """A job that runs until the test creates its gate file; returns (id, gate)."""
        gate = os.path.join(self.tmp, "gate-%d" % time.monotonic_ns())
        job = self.add(self.ledger_job("while [ ! -e %s ]; do sleep 0.05; done" % shlex.quote(gate)))
        return job, gate

    def _sigterm_the_worker_of(self, pool, job):
        self.wait_pool_ready(pool, 1)
        self.wait_until(lambda: self.starts() == [job], 15, "the job to start")
        busy = self.wait_until(lambda: [w["pid"] for w in self.workers() if w["job"] == job], 15,
                          "status to show the job's worker")
        os.kill(busy[0], signal.SIGTERM)
        self.wait_until(lambda: [w for w in self.workers() if w["pid"] == busy[0] and w["stopping"]], 15,
                   "the worker to say it is stopping")
        self.assertEqual(self.job(job)["state"], "processing")
        return busy[0]

    def test_sigterm_to_one_worker_stops_only_that_worker(self):
        # `kill PID` of one worker: it finishes its job and leaves; the
        # supervisor starts another in its place and the pool goes on.
        a, gate = self._gated_job()
        pool = self.start_pool(count=2)
        stopped = self._sigterm_the_worker_of(pool, a)
        open(gate, "w").close()
        self.wait_until(lambda: self.job(a)["state"] == "completed", 15, "the job to finish")
        self.wait_until(lambda: len(self.workers()) == 2 and stopped not in [w["pid"] for w in self.workers()],
                   15, "a new worker in place of the stopped one")
        self.assertIsNone(pool.poll(), "the pool stopped with its worker")
        b = self.add(self.ledger_job("true"))
        self.wait_until(lambda: self.job(b)["state"] == "completed", 15, "the pool to run the next job")
        self.assertEqual((self.job(a)["attempts"], self.ends()), (1, [a, b]))
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=15), 0)
        self.assertIn("stopped by SIGTERM; starting another", self.pool_log(pool))

    def test_worker_stop_after_a_sigterm_to_the_worker_stops_the_pool(self):
        # A worker told twice (its own SIGTERM, then `worker stop`) must not be
        # replaced: `worker stop` means the whole pool.
        a, gate = self._gated_job()
        pool = self.start_pool(count=1)
        self._sigterm_the_worker_of(pool, a)
        stop = self.spawn("worker", "stop", "--timeout", "30", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: stop.poll() is None and stop.kill())
        self.wait_until(lambda: self.query_one("SELECT count(*) FROM workers WHERE stop_requested & %d"
                                    % queuectl.STOP_ASKED) == 1, 15, "worker stop to ask")
        open(gate, "w").close()
        self.assertEqual(pool.wait(timeout=20), 0, self.pool_log(pool))
        out, err = stop.communicate(timeout=30)
        self.assertEqual(stop.returncode, 0, err)
        self.assertEqual(self.job(a)["state"], "completed")
        self.assertNotIn("starting another", self.pool_log(pool))

    def test_ctrl_z_pauses_the_workers_and_fg_resumes_them(self):
        pool = self.start_pool(count=2)
        self.wait_pool_ready(pool, 2)
        workers = children(pool.pid)
        self.assertEqual(len(workers), 2)
        os.kill(pool.pid, signal.SIGTSTP)       # what the terminal sends to its foreground group
        self.wait_until(lambda: all(proc_state(p) == b"T" for p in workers + [pool.pid]), 10, "the pool to pause")
        job = self.add(self.ledger_job("true"))
        os.killpg(pool.pid, signal.SIGCONT)     # `fg`
        self.wait_until(lambda: self.job(job)["state"] == "completed", 15, "the resumed pool to run a job")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=15), 0)

    def test_ctrl_z_never_freezes_a_worker_holding_the_write_lock(self):
        # A pool paused while draining as fast as it can: an enqueue from
        # another shell must still get the lock (a SIGSTOP landing inside a
        # worker's transaction used to hold it until `fg`).
        batch = os.path.join(self.tmp, "batch.jsonl")
        with open(batch, "w") as f:
            f.write('{"command": "true"}\n' * 3000)
        self.script_text("enqueue", "--file", batch)
        pool = self.start_pool(count=2)
        self.wait_pool_ready(pool, 2)
        workers = children(pool.pid)
        for _ in range(4):
            os.kill(pool.pid, signal.SIGTSTP)
            self.wait_until(lambda: all(proc_state(p) == b"T" for p in workers + [pool.pid]), 10, "the pool to pause")
            code, out, err = self.script("enqueue", "--", "true", env=self.env(QUEUECTL_BUSY_TIMEOUT="2"))
            self.assertEqual(code, 0, err)
            os.killpg(pool.pid, signal.SIGCONT)
            self.wait_until(lambda: all(proc_state(p) != b"T" for p in workers + [pool.pid]), 10, "the pool to resume")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=15), 0)

    def test_jobs_get_default_signal_dispositions(self):
        # Workers ignore SIGINT (by a handler) and SIGTTOU (around log writes):
        # neither may reach a job as ignored.
        def ignored(status):
            line = [l for l in status.splitlines() if l.startswith("SigIgn:")][0]
            mask = int(line.split()[1], 16)
            return {sig for sig in (signal.SIGINT, signal.SIGTTOU) if mask & (1 << (sig - 1))}
        with open("/proc/self/status") as f:
            ours = ignored(f.read())
        job = self.add("cat /proc/$$/status")
        self.run_once()
        code, out, err = self.script("logs", job)
        self.assertEqual(ignored(out.decode()) - (ours - {signal.SIGINT}), set())

    def test_sighup_drains_like_sigterm(self):
        # The terminal went away: stop gracefully rather than die and leave
        # the workers to find out. (Under nohup SIGHUP stays ignored.)
        if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
            self.skipTest("SIGHUP is ignored here (nohup?): the pool would inherit that")
        a, gate = self._gated_job()
        pool = self.start_pool(count=1)
        self.wait_pool_ready(pool, 1)
        self.wait_until(lambda: self.starts() == [a], 15, "the job to start")
        os.kill(pool.pid, signal.SIGHUP)
        self.wait_until(lambda: "stopping" in self.pool_log(pool), 10, "the pool to start draining")
        os.kill(pool.pid, signal.SIGHUP)        # a closing terminal often sends two
        self.wait_until(lambda: self.pool_log(pool).count("stopping") == 1 and
                   [w for w in self.workers() if w["stopping"]], 10, "the worker to drain")
        self.assertEqual(self.job(a)["state"], "processing")
        open(gate, "w").close()
        self.assertEqual(pool.wait(timeout=15), 0, self.pool_log(pool))
        self.assertEqual(self.job(a)["state"], "completed")

    def test_killmode_mixed_drains(self):
        # systemd, KillMode=mixed: SIGTERM to the main process only; when it
        # has exited (or TimeoutStopSec passed) SIGKILL to whatever is left.
        a, b, c, pool = self.sigterm_a_pool_running_two_of_three(1)
        code = pool.wait(timeout=15)            # TimeoutStopSec
        left = pids_of_session(pool.pid) + pids_of_db(self.db)
        kill_all(left)
        self.assertEqual(code, 0)
        self.assertEqual(left, [], "processes left for the final SIGKILL")
        jobs = self.jobs_by_id()
        self.assertEqual([jobs[i]["state"] for i in (a, b, c)], ["completed", "completed", "pending"])
        self.assertEqual(jobs[c]["attempts"], 0)
        self.assertEqual(sorted(self.ends()), sorted([a, b]))

    def test_killmode_mixed_kills_a_long_job_and_it_runs_again(self):
        # A job longer than TimeoutStopSec dies in the final SIGKILL with its
        # worker; the next worker takes it back and runs it again.
        job, marker, pool = self.start_a_grandchild_that_hangs_once(count=1)
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(1.0)                         # a short TimeoutStopSec
        self.assertIsNone(pool.poll(), "the pool should still be waiting for its job")
        # The whole cgroup: the pool, its workers, the job and its children.
        kill_all(pids_of_session(pool.pid) + pids_of_db(self.db))
        pool.wait(timeout=10)
        self.wait_until(lambda: not processes_running(marker), 5, "the cgroup to be empty")
        self.assertEqual(self.job(job)["state"], "processing")
        self.run_once()
        self.assert_lost_then_completed(job)

    def test_grandchildren_gone_after_a_timeout(self):
        marker = self.marker()
        stubborn = self.marker()
        # One grandchild dies of SIGTERM; one ignores it and must be SIGKILLed.
        job = self.add("sleep %s & (trap '' TERM; exec sleep %s) & sleep 30" % (marker, stubborn),
                     timeout=1, max_retries=0)
        t0 = time.monotonic()
        self.run_once()
        self.assertLess(time.monotonic() - t0, 8.0)
        self.assertEqual(processes_running(marker) + processes_running(stubborn), [])
        row = self.job(job)
        self.assertEqual((row["state"], row["outcome"]), ("dead", "timeout"))

    def test_grandchildren_gone_after_a_hard_stop(self):
        marker = self.marker()
        self.add("sleep %s >/dev/null 2>&1 & sleep 30" % marker)
        pool = self.start_pool(count=1)
        self.wait_until(lambda: processes_running(marker), 15, "the job to start")
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=20), 130)
        self.wait_until(lambda: not processes_running(marker), 5, "the grandchild to be gone")

    def test_grandchildren_gone_after_pool_sigkill_and_reclaim(self):
        job, marker, pool = self.start_a_grandchild_that_hangs_once(count=2)
        # The whole pool dies at once; the job's processes (own session) live on.
        kill_session(pool.pid)
        pool.wait(timeout=10)
        time.sleep(0.2)
        self.assertTrue(processes_running(marker), "the job's grandchild should have survived")
        self.assertEqual(self.job(job)["state"], "processing")
        # A new worker finds the lease holder dead, kills what is left of the
        # job on this host, and runs the job again.
        self.run_once()
        self.wait_until(lambda: not processes_running(marker), 5, "the orphaned grandchild to be killed")
        self.assert_lost_then_completed(job)
        self.assertEqual(pids_of_db(self.db), [])

    def test_job_of_a_killed_worker_not_yet_reaped_is_reclaimed_at_once(self):
        # A worker died but its parent has not reaped it yet (the supervisor
        # is busy, or init is slow): the zombie is dead, its job is free.
        job, marker, pool = self.start_a_grandchild_that_hangs_once(count=1)
        worker = children(pool.pid)
        self.assertEqual(len(worker), 1)
        os.kill(pool.pid, signal.SIGSTOP)      # cleanup's SIGKILL works on it stopped
        os.kill(worker[0], signal.SIGKILL)
        self.wait_until(lambda: is_zombie(worker[0]), 5, "the worker to be a zombie")
        self.run_once()
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("completed", 2))
        self.wait_until(lambda: not processes_running(marker), 5, "the orphaned grandchild to be killed")

    def test_stop_during_a_restart_delay_is_prompt(self):
        # A worker that dies within a second of its start is restarted after
        # a growing delay; a SIGTERM must not wait for that delay to pass.
        pool = self.start_pool(count=1)
        deadline = time.monotonic() + 20
        while "restarting in 2s" not in self.pool_log(pool):
            self.assertLess(time.monotonic(), deadline, "no restart delay: " + self.pool_log(pool))
            kill_all(children(pool.pid))
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(pool.pid, signal.SIGTERM)
        code = pool.wait(timeout=30)
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - t0, 1.0, "SIGTERM waited for the restart delay")

    def test_daemonized_grandchild_gone_after_a_timeout(self):
        # `setsid` takes a grandchild out of the job's process group, so
        # killing the group misses it; its environment still names the job.
        marker = self.marker()
        job = self.add("setsid sleep %s >/dev/null 2>&1 & sleep 30" % marker, timeout=1, max_retries=0)
        self.run_once()
        self.assertEqual(self.job(job)["outcome"], "timeout")
        self.wait_until(lambda: not processes_running(marker), 3, "the daemonized grandchild to be gone")


class ContentionTest(QueueTestCase):
    """Many processes enqueueing at once while a pool drains: no lock errors, each job run once."""

    ENQUEUERS = 14          # processes enqueueing one job at a time ...
    EACH = 6                # ... this many times each
    BATCHES = 2             # plus processes enqueueing a --file batch ...
    BATCH = 60              # ... of this many jobs

    def test_sixteen_enqueuers_while_pool_drains(self):
        pool = self.start_pool(count=4)
        self.wait_pool_ready(pool, 4)
        command = self.ledger_command('"$QUEUECTL_JOB_ID"')
        results = []            # (exit code, stdout, stderr) of every queuectl run
        lock = threading.Lock()
        go = threading.Event()

        def one_by_one():
            go.wait()
            for _ in range(self.EACH):
                r = self.script("enqueue", "--", command)
                with lock:
                    results.append(r)

        def batch():
            data = "".join(json.dumps({"command": command}) + "\n" for _ in range(self.BATCH)).encode()
            go.wait()
            r = self.script("enqueue", "--file", "-", stdin=data)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one_by_one) for _ in range(self.ENQUEUERS)]
        threads += [threading.Thread(target=batch) for _ in range(self.BATCHES)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(timeout=120)
            self.assertFalse(t.is_alive(), "an enqueuer did not finish")

        expected = self.ENQUEUERS * self.EACH + self.BATCHES * self.BATCH
        self.assertEqual(len(results), self.ENQUEUERS * self.EACH + self.BATCHES)
        for code, out, err in results:
            text = err.decode("utf-8", "replace")
            self.assertNotIn("locked", text)
            self.assertNotIn("Traceback", text)
            self.assertEqual(code, 0, text)
            self.assertEqual(text, "")
        ids = [i for _, out, _ in results for i in out.decode().split()]
        self.assertEqual(len(ids), expected)
        self.assertEqual(len(set(ids)), expected, "an id was returned twice")

        def drained():
            jobs = self.jobs_by_id()
            return sum(1 for j in jobs.values() if j["state"] == "completed") == expected
        self.wait_until(drained, 60, "the pool to run every job", interval=0.2)
        self.assertEqual(set(self.jobs_by_id()), set(ids))
        ran = self.ledger_lines()
        self.assertEqual(sorted(ran), sorted(ids), "a job ran twice or not at all")

        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=20), 0)
        log = self.pool_log(pool)
        self.assertNotIn("locked", log)
        self.assertNotIn("Traceback", log)


class ChaosTest(unittest.TestCase):
    """chaos.py's short run: workers and whole pools SIGKILLed while jobs run lose no job."""

    def test_chaos_short_run(self):
        if not LINUX:
            self.skipTest("needs Linux /proc")
        sys.path.insert(0, HERE)
        try:
            import chaos
        finally:
            sys.path.remove(HERE)
        out = io.StringIO()
        code = chaos.main(["--jobs", "60", "--seconds", "8", "--quiet"], out=out)
        self.assertEqual(code, 0, "chaos run failed:\n" + out.getvalue())


###############################################################################
# status, list, show, logs, wait, retry, cancel, dlq, config, stats, purge ####
###############################################################################

class TestCommands(QueueTestCase):
    """status, list, show, logs, dlq, cancel, retry, config, stats, purge and wait as the README shows them."""

    def populate(self):
        """One job in each state but processing, made by a real `worker start --once`."""
        self.expect_success("config", "set", "backoff-max", "1h", err=None)
        ids = {
            "ok": self.add("echo out; echo err >&2", id="ok"),
            "flaky": self.add("echo try $QUEUECTL_ATTEMPT; exit 4", id="flaky", max_retries=1),
            "broken": self.add("echo try $QUEUECTL_ATTEMPT; exit 3", id="broken", max_retries=0),
            "later": self.add("true", id="later", delay="1h"),
        }
        self.run_once()
        return ids

    def status_counts(self, out):
        counts = {}
        for line in out.splitlines():
            m = re.match(r"^(\w+)\s+(\d+)$", line)
            if m and m.group(1) in STATES:
                counts[m.group(1)] = int(m.group(2))
        return counts

    def test_status_empty_shows_all_five_states(self):
        self.init_db()      # an empty queue in a database (a missing one adds a note)
        out = self.expect_success("status")
        self.assertEqual(self.status_counts(out), {s: 0 for s in STATES})
        self.assertIn("no active workers", out)
        data = json.loads(self.expect_success("status", "--json"))
        self.assertEqual(data["counts"], {s: 0 for s in STATES})
        self.assertEqual(data["workers"], [])

    def test_status_counts(self):
        self.populate()
        expected = {"pending": 1, "processing": 0, "completed": 1, "failed": 1, "dead": 1}
        self.assertEqual(self.status_counts(self.expect_success("status")), expected)
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["counts"], expected)

    def test_list(self):
        self.populate()
        out = self.expect_success("list")
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("ID"), out)
        self.assertEqual([line.split()[0] for line in lines[1:]], ["ok", "flaky", "broken", "later"])
        self.assertEqual(out.count("\n"), 5)
        self.assertEqual([j["id"] for j in self.jobs("--state", "dead")], ["broken"])
        self.assertEqual([j["id"] for j in self.jobs("--state", "failed")], ["flaky"])
        self.assertEqual([j["id"] for j in self.jobs("-s", "processing")], [])
        self.assertEqual([line.split()[0] for line in self.expect_success("list", "--state", "completed")
                          .splitlines()[1:]], ["ok"])
        data = json.loads(self.expect_success("list", "--limit", "2", "--json"))
        self.assertEqual([j["id"] for j in data], ["broken", "later"])
        self.assertEqual(self.expect_success("list", "-n", "1").splitlines()[1].split()[0], "later")
        for job in data:
            self.assertEqual(set(JOB_JSON_FIELDS) - set(job), set())
            for field in ("run_at", "created_at", "updated_at"):
                iso_to_ts(job[field])
        self.assertEqual(data[0]["exit_code"], 3)

    def test_list_and_show_escape_control_characters(self):
        job_id = self.add("echo a\necho b\x1b[31m")
        out = self.expect_success("list")
        self.assertEqual(len(out.splitlines()), 2, out)
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x1b", self.expect_success("show", job_id))
        self.assertEqual(self.job(job_id)["command"], "echo a\necho b\x1b[31m")

    def test_list_empty_and_unknown_state(self):
        self.init_db()      # an empty queue in a database (a missing one adds a note)
        self.assertEqual(self.expect_success("list", err=None), "")
        self.assertEqual(json.loads(self.expect_success("list", "--json")), [])
        self.expect_failure("list", "--state", "running",
                            err="queuectl: error: unknown state 'running' "
                                "(valid: pending, processing, completed, failed, dead)")

    def test_show(self):
        self.populate()
        job = self.job("broken")
        self.assertEqual(set(JOB_JSON_FIELDS) - set(job), set())
        self.assertEqual((job["id"], job["command"], job["state"], job["attempts"], job["max_retries"],
                          job["priority"], job["timeout"], job["exit_code"]),
                         ("broken", "echo try $QUEUECTL_ATTEMPT; exit 3", "dead", 1, 0, 0, None, 3))
        for field in ("run_at", "created_at", "updated_at"):
            iso_to_ts(job[field])
        [run] = job["runs"]
        started, finished = iso_to_ts(run["started_at"]), iso_to_ts(run["finished_at"])
        self.assertLessEqual(started, finished)
        self.assertAlmostEqual(run["duration"], finished - started, delta=0.01)
        self.assertEqual((run["exit_code"], run["outcome"]), (3, "exit 3"))
        self.assertEqual(self.job("later")["runs"], [])
        text = self.expect_success("show", "broken")
        for needle in ("broken", "dead", "echo try $QUEUECTL_ATTEMPT; exit 3", "exit 3", "1/1"):
            self.assertIn(needle, text)
        self.assertIn("no runs yet", self.expect_success("show", "later"))
        self.expect_failure("show", "nope", err="queuectl: error: job 'nope' not found")

    def test_logs(self):
        self.populate()
        code, out, err = self.run_cli_bytes("logs", "ok")
        self.assertEqual((code, out, err), (0, b"out\n", b"err\n"))
        self.expect_success("dlq", "retry", "broken", err=None)
        self.run_once()
        self.expect_success("dlq", "retry", "broken", err=None)
        self.run_once()
        self.assertEqual(self.expect_success("logs", "broken"), "try 1\n")
        self.assertEqual(len(self.job("broken")["runs"]), 3)
        self.assertEqual(self.expect_success("logs", "flaky", "--attempt", "1"), "try 1\n")
        self.assertEqual(self.expect_success("logs", "ok", "-a", "1", err="err\n"), "out\n")
        self.expect_failure("logs", "flaky", "--attempt", "2",
                            err="queuectl: error: job 'flaky' has no run 2 (see 'queuectl show flaky')")
        self.expect_failure("logs", "flaky", "--attempt", "0", code=2)
        self.expect_failure("logs", "later", err="queuectl: error: job 'later' has not run yet")
        self.expect_failure("logs", "nope", err="queuectl: error: job 'nope' not found")

    def test_logs_after_retries(self):
        self.expect_success("config", "set", "backoff-max", "0", err=None)
        self.add("echo try $QUEUECTL_ATTEMPT; echo e$QUEUECTL_ATTEMPT >&2; exit 3", id="r", max_retries=2)
        self.run_once()
        self.assertEqual(self.expect_success("logs", "r", err="e3\n"), "try 3\n")
        for n in (1, 2, 3):
            out = self.expect_success("logs", "r", "--attempt", n, err="e%d\n" % n)
            self.assertEqual(out, "try %d\n" % n)

    def test_dlq(self):
        self.populate()
        self.assertEqual(self.dlq_ids(), ["broken"])
        out = self.expect_success("dlq", "list")
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], ["broken"])
        self.assertIn("exit 3", out)
        self.expect_failure("dlq", "retry", "ok",
                            err="queuectl: error: job 'ok' is not in the DLQ (it is completed)")
        self.expect_failure("dlq", "retry", "later",
                            err="queuectl: error: job 'later' is not in the DLQ (it is pending)")
        self.expect_failure("dlq", "retry", "broken", "nope", err="queuectl: error: job 'nope' not found")
        self.expect_failure("dlq", "retry", code=2)
        self.expect_failure("dlq", "retry", "--all", "broken", code=2)
        before = time.time()
        self.expect_success("dlq", "retry", "broken", err="queuectl: 1 job moved back to pending\n")
        job = self.job("broken")
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertLess(abs(iso_to_ts(job["run_at"]) - before), 5)
        self.assertEqual(json.loads(self.expect_success("dlq", "list", "--json")), [])
        self.expect_success("dlq", "list", err=None)

    def test_dlq_retry_all_and_rerun(self):
        flag = os.path.join(self.tmp, "ready")
        ids = [self.add("test -f %s" % shlex.quote(flag), max_retries=0) for _ in range(3)]
        self.run_once()
        self.assertEqual(sorted(self.dlq_ids()), ids)
        open(flag, "w").close()
        self.expect_success("dlq", "retry", "--all", err="queuectl: 3 jobs moved back to pending\n")
        self.assertEqual({self.job(i)["state"] for i in ids}, {"pending"})
        self.run_once()
        for job_id in ids:
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"], len(job["runs"])), ("completed", 1, 2))
        self.expect_success("dlq", "retry", "--all", err="queuectl: 0 jobs moved back to pending\n")

    def test_cancel_waiting_jobs(self):
        a = self.add("true")
        b = self.add("true", delay="1h")
        self.expect_success("cancel", a, b, err="queuectl: job %s cancelled (moved to DLQ)\n"
                            "queuectl: job %s cancelled (moved to DLQ)\n" % (a, b))
        for job_id in (a, b):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["outcome"]), ("dead", "cancelled"))
        self.assertEqual(len(json.loads(self.expect_success("dlq", "list", "--json"))), 2)
        self.expect_failure("cancel", a,
                            err="queuectl: error: job '%s' cannot be cancelled: it is already dead" % a)
        c = self.add("true")
        self.expect_failure("cancel", c, "nope", err="queuectl: error: job 'nope' not found")
        self.assertEqual(self.job(c)["state"], "pending")
        self.run_once()
        self.expect_failure("cancel", c,
                            err="queuectl: error: job '%s' cannot be cancelled: it is already completed" % c)

    def test_config(self):
        self.init_db()      # an empty queue in a database (a missing one adds a note)
        defaults = {"max_retries": 3, "backoff_base": 2, "backoff_max": 3600, "timeout": None}
        config = json.loads(self.expect_success("config", "list", "--json"))
        self.assertEqual({k: config.get(k) for k in defaults}, defaults)   # "at least" these keys
        out = self.expect_success("config", "list")
        for key in ("max_retries", "backoff_base", "backoff_max", "timeout"):
            self.assertIn(key, out)
        for key, value in (("max_retries", "3"), ("max-retries", "3"), ("backoff_base", "2"),
                           ("backoff-max", "3600"), ("timeout", "none")):
            self.assertEqual(self.expect_success("config", "get", key), value + "\n")
        self.assertEqual(self.expect_success("config", "set", "max-retries", "5",
                                             err="queuectl: max_retries set to 5\n"), "")
        self.assertEqual(self.expect_success("config", "get", "max_retries"), "5\n")
        self.expect_success("config", "set", "backoff_base", "1.5", err=None)
        self.assertEqual(self.expect_success("config", "get", "backoff-base"), "1.5\n")
        self.expect_success("config", "set", "backoff-max", "1h", err=None)
        self.assertEqual(self.expect_success("config", "get", "backoff_max"), "3600\n")
        self.expect_success("config", "set", "backoff-max", "0", err=None)
        self.assertEqual(self.expect_success("config", "get", "backoff_max"), "0\n")
        self.expect_success("config", "set", "timeout", "30s", err=None)
        self.assertEqual(self.expect_success("config", "get", "timeout"), "30\n")
        config = json.loads(self.expect_success("config", "list", "--json"))
        self.assertEqual({k: config.get(k) for k in defaults},
                         {"max_retries": 5, "backoff_base": 1.5, "backoff_max": 0, "timeout": 30})
        self.expect_success("config", "set", "timeout", "none", err=None)
        self.assertEqual(self.expect_success("config", "get", "timeout"), "none\n")
        # Config lives in the database: another process sees it.
        code, out, err = self.script("config", "get", "max-retries")
        self.assertEqual((code, out, err), (0, b"5\n", b""))

    def test_config_errors(self):
        self.expect_success("config", "set", "max_retries", "4", err=None)
        for args in (("set", "retries", "4"), ("get", "max retries"), ("get", "max_retries_")):
            line = self.expect_failure("config", *args)
            prefix = "queuectl: error: unknown config key %r (" % args[1]
            self.assertTrue(line.startswith(prefix), line)
            valid = re.search(r"\(valid: ([^)]*)\)", line).group(1).split(", ")
            for key in ("max_retries", "backoff_base", "backoff_max", "timeout"):
                self.assertIn(key, valid, line)
        bad = [("max_retries", "-1"), ("max_retries", "abc"), ("max_retries", "1.5"), ("max-retries", ""),
               ("backoff_base", "0.5"), ("backoff_base", "two"), ("backoff_base", "nan"),
               ("backoff_max", "-1"), ("backoff-max", "soon"), ("timeout", "-5"), ("timeout", "abc")]
        for key, value in bad:
            with self.subTest(key=key, value=value):
                line = self.expect_failure("config", "set", key, value)
                self.assertTrue(line.startswith("queuectl: error: invalid value %r for %s: expected "
                                                % (value, key.replace("-", "_"))), line)
        self.expect_failure("config", "set", "max_retries", code=2)
        self.assertEqual(self.expect_success("config", "get", "max_retries"), "4\n")

    def test_earlier_designs_spellings_are_accepted(self):
        self.assertEqual(self.expect_success("config", "max_retries", "5", err="queuectl: max_retries set to 5\n"), "")
        self.expect_success("config", "backoff_base", "3", err="queuectl: backoff_base set to 3\n")
        self.expect_success("config", "max_backoff_seconds", "10", err="queuectl: backoff_max set to 10\n")
        self.expect_success("config", "set", "job_time_out_seconds", "30", err="queuectl: timeout set to 30\n")
        self.assertEqual(self.expect_success("config", "get", "timeout"), "30\n")
        self.expect_success("config", "job_timeout", "1m", err="queuectl: timeout set to 60\n")
        self.expect_success("config", "set", "max-retries", "5", err=None)
        self.assertEqual(self.expect_success("config", "max_retries"), "5\n")
        self.assertEqual(self.expect_success("config", "job-timeout"), "60\n")
        config = json.loads(self.expect_success("config", "list", "--json"))
        self.assertEqual((config["backoff_base"], config["backoff_max"], config["timeout"]), (3, 10, 60))
        # dlq-retry ID, and dlq retry --reset-retries
        dead = self.add("exit 3", id="d1", max_retries=0)
        other = self.add("exit 3", id="d2", max_retries=0)
        self.run_once()
        self.expect_success("dlq-retry", dead, err="queuectl: 1 job moved back to pending\n")
        self.assertEqual((self.job(dead)["state"], self.job(dead)["max_retries"]), ("pending", 0))
        self.expect_success("dlq", "retry", "--reset-retries", other, err=None)
        self.assertEqual((self.job(other)["state"], self.job(other)["max_retries"]), ("pending", 5))
        # the JSON field next_run_at
        job_id = self.add("true", next_run_at="2030-01-01T00:00:00Z")
        self.assertEqual(self.job(job_id)["run_at"], "2030-01-01T00:00:00.000Z")
        out = self.expect_success("enqueue", "--delay", "1h", "-f", "-",
                                  stdin=b'{"command": "true", "next_run_at": "2031-01-01T00:00:00Z"}')
        self.assertEqual(self.job(out.strip())["run_at"], "2031-01-01T00:00:00.000Z")
        self.expect_failure("enqueue", json.dumps({"command": "true", "run_at": "2030-01-01T00:00:00Z",
                                                   "next_run_at": "2030-01-01T00:00:00Z"}),
                            err="queuectl: error: give either 'run_at' or 'next_run_at', not both")

    @sqlite_only
    def test_init_creates_the_database_and_says_where(self):
        self.db = os.path.join(self.tmp, "new", "q.db")
        self.assertEqual(self.expect_success("init", err="queuectl: database created\n"), self.db + "\n")
        self.assertEqual(self.db_dump()["user_version"], queuectl.SCHEMA_VERSION)
        self.add("true", id="kept")
        self.assertEqual(self.expect_success("init", err="queuectl: database exists; nothing changed\n"),
                         self.db + "\n")
        self.assertEqual([j["id"] for j in self.jobs()], ["kept"])
        os.environ["QUEUECTL_DB"] = os.path.join(self.tmp, "env.db")
        self.assertEqual(self.expect_success("init", db=False, err=None), os.environ["QUEUECTL_DB"] + "\n")

    def test_hints_for_mistakes(self):
        self.expect_failure("config", "set", "max_retry", "4", err=(
            "queuectl: error: unknown config key 'max_retry' (did you mean 'max_retries'?) "
            "(valid: max_retries, backoff_base, backoff_max, timeout, retention)"))
        self.expect_failure("config", "max-retires", "4", err_prefix=(
            "queuectl: error: unknown config key 'max-retires' (did you mean 'max_retries'?)"))
        self.expect_failure("config", "lst", code=2, err_prefix=(
            "queuectl: error: config: argument ACTION: invalid choice: 'lst'"))
        self.expect_failure("list", "--limt", "3", code=2, err=(
            "queuectl: error: list: unrecognized arguments: --limt 3 (did you mean --limit?) "
            "(see 'queuectl list --help')"))
        self.expect_failure("worker", "start", "--cuont", "2", code=2, err=(
            "queuectl: error: worker start: unrecognized arguments: --cuont 2 (did you mean --count?) "
            "(see 'queuectl worker start --help')"))
        self.expect_failure("enqueue", "ls", "-la", code=2, err=(
            "queuectl: error: enqueue: unrecognized arguments: -la (to enqueue a command, put it after --: "
            "queuectl enqueue -- COMMAND) (see 'queuectl enqueue --help')"))

    def test_help_texts_and_confirmations(self):
        for command in ("show", "logs"):
            self.assertRegex(self.expect_success(command, "--help"), r"\n  ID +the job's id")
        config_help = self.expect_success("config", "set", "--help")
        for key in queuectl.CONFIG_DEFAULTS:
            self.assertRegex(config_help, r"\n  %s +\S" % key)
        top = self.expect_success("--help")
        self.assertIn("\nenvironment:\n", top)
        self.assertIn("\nexit codes:", top)
        for args in (["list"], ["worker", "start"], ["config", "set"]):
            self.assertNotIn("QUEUECTL_BUSY_TIMEOUT", self.expect_success(*(args + ["--help"])), args)
        self.add("true")
        self.add("exit 1", max_retries=0)
        self.run_once()
        self.expect_success("purge", "-s", "completed", "-s", "dead",
                            err="queuectl: purged 1 completed job, 1 dead job\n")

    def test_zero_durations_are_refused_and_values_round_trip(self):
        self.expect_success("config", "set", "retention", "7d", err=None)
        for key, meaning in (("timeout", "no timeout"), ("retention", "keep completed jobs forever")):
            for value in ("0", "0s", "0.0", "0m", "00", "0.000h"):
                self.expect_failure("config", "set", key, value, err=(
                    "queuectl: error: invalid value %r for %s: zero is ambiguous here; use 'none' (%s) "
                    "or a positive duration" % (value, key, meaning)))
        self.expect_failure("enqueue", "--timeout", "0s", "--", "true")
        self.expect_failure("enqueue", '{"command": "true", "timeout": "0m"}')
        # Whatever `config get` prints, typed back, means the same.
        for key, value in (("timeout", "30s"), ("timeout", "0.5"), ("timeout", "none"), ("retention", "7d"),
                           ("retention", "1.25m"), ("backoff_max", "0"), ("backoff_base", "1.5"),
                           ("max_retries", "0")):
            with self.subTest(key=key, value=value):
                self.expect_success("config", "set", key, value, err=None)
                shown = self.expect_success("config", "get", key).strip()
                stored = json.loads(self.expect_success("config", "list", "--json"))[key]
                self.expect_success("config", "set", key, shown, err=None)
                self.assertEqual(self.expect_success("config", "get", key).strip(), shown)
                self.assertEqual(json.loads(self.expect_success("config", "list", "--json"))[key], stored)

    def test_config_list_shows_durations_as_given(self):
        for key, value in (("retention", "7d"), ("timeout", "90"), ("backoff_max", "2h")):
            self.expect_success("config", "set", key, value, err=None)
        rows = {line.split()[0]: line for line in self.expect_success("config", "list").splitlines()[1:]}
        self.assertRegex(rows["retention"], r"^retention +604800 \(7d\) +workers delete")
        self.assertRegex(rows["timeout"], r"^timeout +90 +default job timeout")
        self.assertRegex(rows["backoff_max"], r"^backoff_max +7200 \(2h\) +upper bound")
        self.assertRegex(rows["max_retries"], r"^max_retries +3 +retries")
        self.assertEqual(self.expect_success("config", "get", "retention"), "604800\n")

    @sqlite_only
    def test_zero_stored_by_an_older_version_means_none(self):
        """`config set retention 0s` used to store 0, which deleted every
        completed job; `0` meant keep forever. Both now read as none."""
        done = self.add("true")
        self.run_once()
        self.init_db()
        conn = self.connect(readonly=False)
        conn.execute("INSERT OR REPLACE INTO config (key, value) VALUES ('retention', '0.0'), ('timeout', '0.0')")
        conn.commit()
        conn.close()
        self.assertEqual(self.expect_success("config", "get", "retention"), "none\n")
        self.assertEqual(self.expect_success("config", "get", "timeout"), "none\n")
        later = self.add("true")
        self.assertIsNone(self.job(later)["timeout"])
        self.run_once()
        self.assertEqual([j["id"] for j in self.jobs()], [done, later])

    def test_config_defaults_apply_to_new_jobs(self):
        before = self.add("true")
        self.expect_success("config", "set", "max_retries", "5", err=None)
        self.expect_success("config", "set", "timeout", "90", err=None)
        after = self.job(self.add("true"))
        self.assertEqual((after["max_retries"], after["timeout"]), (5, 90))
        explicit = self.job(self.add("true", max_retries=1, timeout=None))
        self.assertEqual((explicit["max_retries"], explicit["timeout"]), (1, None))
        self.assertEqual((self.job(before)["max_retries"], self.job(before)["timeout"]), (3, None))

    def test_stats(self):
        self.init_db()      # an empty queue in a database (a missing one adds a note)
        empty = json.loads(self.expect_success("stats", "--json"))
        fields = {"completed", "failed_runs", "dead", "success_rate", "duration_p50", "duration_p95",
                  "duration_max", "throughput_per_min"}
        for window in ("last_hour", "last_day"):
            self.assertEqual(set(empty[window]), fields)
            s = empty[window]
            self.assertEqual((s["completed"], s["failed_runs"], s["dead"], s["success_rate"]),
                             (0, 0, 0, None))
        self.populate()
        stats = json.loads(self.expect_success("stats", "--json"))
        for window in ("last_hour", "last_day"):
            s = stats[window]
            self.assertEqual((s["completed"], s["failed_runs"], s["dead"]), (1, 2, 1), window)
            self.assertAlmostEqual(s["success_rate"], 1 / 3, places=3)
            self.assertLessEqual(s["duration_p50"], s["duration_p95"])
            self.assertLessEqual(s["duration_p95"], s["duration_max"])
            self.assertGreater(s["throughput_per_min"], 0)
        out = self.expect_success("stats")
        for label in ("completed", "failed runs", "dead", "success rate", "p50", "p95", "max", "throughput"):
            self.assertIn(label, out)

    def test_wait_exit_codes(self):
        self.populate()
        self.assertEqual(self.expect_success("wait", "ok"), "")
        code, out, err = self.run_cli("wait", "ok", "broken")
        self.assertEqual((code, out, err), (3, "", "queuectl: job broken is dead (exit 3)\n"))
        cancelled = self.add("true", delay="1h")
        self.expect_success("cancel", cancelled, err=None)
        code, out, err = self.run_cli("wait", cancelled)
        self.assertEqual((code, out), (1, ""))
        started = time.monotonic()
        code, out, err = self.run_cli("wait", "ok", "later", "--timeout", "0.3")
        # It says why the job waits (issue 9), then gives up.
        self.assertEqual((code, out), (124, ""))
        self.assertRegex(err, r"^queuectl: job later: scheduled at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n"
                              r"queuectl: timed out waiting for 1 job: later\n$")
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.expect_failure("wait", "ok", "nope", err="queuectl: error: job 'nope' not found")
        self.expect_failure("wait", "ok", "--timeout", "soon", code=2)

    def test_wait_on_a_cancelled_job_exits_1(self):
        """Cancelled after a failed `exit 4` run: its exit code is that run's, but
        the job died of the cancel (README: a cancelled job makes wait exit 1)."""
        self.populate()
        self.expect_success("cancel", "flaky", err=None)
        self.assertEqual(self.job("flaky")["exit_code"], 4)
        code, out, err = self.run_cli("wait", "flaky")
        self.assertEqual((code, out, err), (1, "", "queuectl: job flaky is dead (cancelled)\n"))
        code, out, err = self.run_cli("wait", "flaky", "broken")
        self.assertEqual((code, out, err), (1, "", "queuectl: job flaky is dead (cancelled)\n"
                                                     "queuectl: job broken is dead (exit 3)\n"))

    def test_wait_on_a_job_deleted_while_waiting(self):
        job_id = self.add("true", delay="1h")
        other = self.add("true", delay="1h")
        first_read = threading.Event()
        real_states = queuectl.Store.states

        def states(store, ids):         # tells the deleter that wait has seen the job
            found = real_states(store, ids)
            first_read.set()
            return found

        problems = []

        def delete():
            try:
                if first_read.wait(DEADLINE):
                    with self.open_store() as store:
                        store.cancel([job_id])
                        problems.append("purged %d" % store.purge(["dead"], time.time() + 1))
            except BaseException as e:          # shown by the assertion below
                problems.append(repr(e))

        deleter = threading.Thread(target=delete)
        with mock.patch.object(queuectl.Store, "states", states):
            deleter.start()
            started = time.monotonic()
            code, out, err = self.run_cli("wait", other, job_id, "--timeout", "10")
            deleter.join(DEADLINE)
        # Before the error, wait says why the jobs wait (scheduled in an hour).
        self.assertEqual((code, out, problems), (1, "", ["purged 1"]), err)
        self.assertTrue(err.endswith("queuectl: error: job %r no longer exists: it was deleted "
                                     "while waiting (purge or the retention setting)\n" % job_id), err)
        self.assertNotIn("Traceback", err)
        self.assertLess(time.monotonic() - started, 5)

    def test_retry_a_failed_job_now(self):
        self.expect_success("config", "set", "backoff-max", "1h", err=None)
        self.expect_success("config", "set", "backoff-base", "1000", err=None)
        job_id = self.add("%s; test $QUEUECTL_ATTEMPT = 2" % self.ledger_command(), max_retries=2)
        self.run_once()
        job = self.job(job_id)
        self.assertEqual(job["state"], "failed")
        self.assertGreater(iso_to_ts(job["run_at"]), time.time() + 900)
        self.assertRegex(job["waiting"], r"^retry at ")
        self.run_once()
        self.assertEqual(len(self.ledger()), 1, "retried before its time")
        self.expect_success("retry", job_id, err="queuectl: 1 job due now\n")
        self.run_once()
        self.assertEqual((self.job(job_id)["state"], len(self.ledger())), ("completed", 2))
        before = self.db_dump()
        self.expect_failure("retry", job_id, err="queuectl: error: job %r is completed, not failed: only a failed "
                                                 "job waiting for its retry can be retried now" % job_id)
        dead = self.add("false", max_retries=0)
        self.run_once()
        before = self.db_dump()
        self.expect_failure("retry", dead, err="queuectl: error: job %r is dead: use 'queuectl dlq retry %s'"
                                               % (dead, dead))
        self.expect_failure("retry", "nope", err="queuectl: error: job 'nope' not found")
        self.assertEqual(self.db_dump(), before)

    def test_job_environment_from_env(self):
        out = os.path.join(self.tmp, "env-out")
        job_id = self.expect_success("enqueue", "--env", "GREETING=hello world", "-e", "EMPTY=",
                                     "--", "echo \"$GREETING|$EMPTY|${EMPTY+set}\" > %s" % out).strip()
        other = self.add("echo \"$GREETING\" >> %s" % out, env={"GREETING": "json"})
        self.assertNotIn("hello world", self.expect_success("list"))
        self.assertNotIn("env", self.jobs()[0])
        self.assertEqual(self.job(job_id)["env"], {"GREETING": "hello world", "EMPTY": ""})
        self.assertIn("env:       GREETING=hello world\n", self.expect_success("show", job_id))
        self.run_once()
        with open(out) as f:
            self.assertEqual(f.read(), "hello world||set\njson\n")
        self.assertEqual(self.job(other)["state"], "completed")
        before = self.db_dump()
        for args, code, err in (
                (("enqueue", "--env", "NOEQUALS", "--", "true"), 2, "expected NAME=VALUE, not 'NOEQUALS'"),
                (("enqueue", "--env", "=x", "--", "true"), 2, "expected NAME=VALUE, not '=x'"),
                (("enqueue", '{"command": "true", "env": {"A": 1}}'), 1,
                 "field 'env': the value of A must be UTF-8 text without NUL bytes, not an integer"),
                (("enqueue", '{"command": "true", "env": ["A"]}'), 1,
                 "field 'env' must be an object of NAME: value strings, not an array"),
                (("enqueue", "--env", "QUEUECTL_JOB_ID=x", "--", "true"), 2,
                 "argument -e/--env: QUEUECTL_JOB_ID is reserved (queuectl sets the QUEUECTL_ variables)"),
                (("enqueue", "--env", "1A=x", "--", "true"), 2,
                 "argument -e/--env: '1A' is not a valid variable name (letters, digits and _, "
                 "not starting with a digit)"),
                (("enqueue", "-e", "A-B=x", "--", "true"), 2, "'A-B' is not a valid variable name"),
                (("enqueue", '{"command": "true", "env": {"B C": "x"}}'), 1,
                 "field 'env': 'B C' is not a valid variable name")):
            with self.subTest(args=args):
                code_, out_, err_ = self.run_cli(*args)
                self.assertEqual((code_, out_), (code, ""))
                self.assertIn(err, err_)
                self.assertEqual(err_.count("\n"), 1, err_)
        self.assertEqual(self.db_dump(), before)

    def test_env_flags_add_to_the_json_env(self):
        out = os.path.join(self.tmp, "env-out")
        self.expect_success("enqueue", "-e", "A=flag", "-e", "B=flag",
                            json.dumps({"command": "echo \"$A $B $C\" > %s" % out, "env": {"B": "json", "C": "c"}}))
        self.run_once()
        with open(out) as f:
            self.assertEqual(f.read(), "flag json c\n")

    def test_purge(self):
        self.populate()
        self.expect_success("purge", "--older-than", "1h", err="queuectl: purged 0 completed jobs\n")
        self.expect_success("purge", err="queuectl: purged 1 completed job\n")
        self.assertEqual([j["id"] for j in self.jobs()], ["flaky", "broken", "later"])
        self.expect_failure("logs", "ok", err="queuectl: error: job 'ok' not found")
        self.expect_success("purge", "--state", "dead", err="queuectl: purged 1 dead job\n")
        self.assertEqual([j["id"] for j in self.jobs()], ["flaky", "later"])
        self.expect_failure("purge", "--state", "pending", code=2)
        counts = json.loads(self.expect_success("status", "--json"))["counts"]
        self.assertEqual(counts, {"pending": 1, "processing": 0, "completed": 0, "failed": 1, "dead": 0})

    def test_worker_stop_without_workers(self):
        self.init_db()      # an empty queue in a database (a missing one adds a note)
        self.assertEqual(self.expect_success("worker", "stop", err="queuectl: no workers running\n"), "")

    def test_show_lists_when_each_run_ended(self):
        self.script_text("enqueue", "--id", "x", "--max-retries", "0", "--", "exit 3")
        self.script_text("worker", "start", "--once")
        _, out, _ = self.script_text("show", "x")
        header, row = out.splitlines()[-2:]
        self.assertIn("FINISHED", header)
        self.assertEqual(len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)), 2, row)


class TestLiveLogs(QueueTestCase):
    """logs --follow prints output as the job writes it, and the database keeps only a bounded tail."""

    def test_follow_prints_as_it_comes_and_matches_logs_afterwards(self):
        job_id = self.add("for i in $(seq 30); do echo out $i; echo err $i >&2; sleep 0.1; done; "
                          "printf 'no newline \\377'; exit 3", max_retries=0)
        follower = self.spawn("logs", job_id, "--follow", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
        self.addCleanup(lambda: follower.poll() is None and kill_session(follower.pid))
        self.start_pool()
        first = follower.stdout.readline()          # a deadline: the job's own end, then the pool's kill
        self.assertEqual(first, b"out 1\n")
        self.assertEqual(self.job(job_id)["state"], "processing", "the first line came only after the run")
        out = first + follower.stdout.read()
        err = follower.stderr.read()
        self.assertEqual(follower.wait(DEADLINE), 3)
        code, logged_out, logged_err = self.run_cli_bytes("logs", job_id)
        self.assertEqual(code, 0)
        self.assertEqual(out, logged_out)
        self.assertEqual(err, logged_err)
        self.assertTrue(out.endswith(b"out 30\nno newline \377"), out[-40:])
        self.assertEqual(self.query_one("SELECT COUNT(*) FROM output"), 0)

    def deadline_kill(self, proc):
        """Kill proc's session after DEADLINE: the deadline of a blocking read of its output."""
        import threading
        timer = threading.Timer(DEADLINE, lambda: proc.poll() is None and kill_session(proc.pid))
        timer.daemon = True
        timer.start()
        self.addCleanup(timer.cancel)

    def test_follow_keeps_up_with_a_fast_writer_byte_for_byte(self):
        """6 MB at 2 MB/s (more than the worker's live buffer holds between two regular writes):
        a follower that keeps up gets all of it, the end from the stored tail."""
        job_id = self.add("i=0; while [ $i -lt 30 ]; do head -c 200000 /dev/zero | tr '\\0' x; echo $i; "
                          "echo err$i >&2; i=$((i+1)); sleep 0.1; done")
        out_path = os.path.join(self.tmp, "followed")
        with open(out_path, "wb") as out:
            follower = self.spawn("logs", job_id, "--follow", stdout=out, stderr=subprocess.PIPE,
                                  start_new_session=True)
        self.addCleanup(lambda: follower.poll() is None and kill_session(follower.pid))
        self.deadline_kill(follower)
        pool = self.start_pool()
        err = follower.stderr.read()
        self.assertEqual(follower.wait(DEADLINE), 0)
        with open(out_path, "rb") as f:
            got = f.read()
        expected = b"".join(b"x" * 200000 + b"%d\n" % i for i in range(30))
        self.assertEqual(len(got), len(expected))
        self.assertTrue(got == expected, "the followed output differs from what the job wrote")
        self.assertEqual(err, b"".join(b"err%d\n" % i for i in range(30)))
        self.expect_success("worker", "stop", err=None)
        self.assertEqual(self.wait_pool(pool), 0)

    def test_follow_says_why_a_pending_job_waits(self):
        self.expect_success("queue", "pause", "held", err=None)
        job_id = self.expect_success("enqueue", "-q", "held", "--", "echo hi").strip()
        follower = self.spawn("logs", job_id, "--follow", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
        self.addCleanup(lambda: follower.poll() is None and kill_session(follower.pid))
        self.deadline_kill(follower)
        line = follower.stderr.readline()
        self.assertEqual(line, b"queuectl: job %s: queue held is paused\n" % job_id.encode())
        self.expect_success("queue", "resume", "held", err=None)
        self.run_once()
        self.assertEqual(follower.stdout.read(), b"hi\n")
        self.assertEqual(follower.wait(DEADLINE), 0)

    def test_follow_a_finished_job_and_a_job_that_never_ran(self):
        job_id = self.add("echo hi; exit 4", max_retries=0)
        self.run_once()
        code, out, err = self.run_cli("logs", job_id, "--follow")
        self.assertEqual((code, out, err), (4, "hi\n", ""))
        self.add("true", id="a", delay="1h")
        self.add("true", id="b", after=["a"])
        self.expect_success("cancel", "a", err=None)
        self.expect_failure("logs", "b", "--follow", err="queuectl: error: job 'b' never ran (it is dead)")
        self.expect_failure("logs", "b", "--follow", "-a", "1", code=2, err_prefix="queuectl: error: ")

    def test_a_chatty_job_keeps_at_most_the_live_limit_in_the_database(self):
        # 4 MB over 4 s: unbounded, the worker would store 256 KiB every 0.5 s (2 MiB).
        job_id = self.add("for i in $(seq 40); do head -c 100000 /dev/zero; sleep 0.1; done")
        self.start_pool()
        conn = self.connect()
        self.addCleanup(conn.close)
        stored = []

        def done():
            stored.append(conn.execute("SELECT COALESCE(SUM(length(data)), 0) FROM output").fetchone()[0])
            return conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == "completed"

        self.wait_until(done, message="the chatty job to complete", interval=0.1)
        self.assertGreater(max(stored), 0, "no live output was stored while the job ran")
        self.assertLessEqual(max(stored), queuectl.LIVE_OUTPUT_LIMIT + queuectl.LIVE_BUFFER_LIMIT)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM output").fetchone()[0], 0)

    def test_live_output_buffer_is_bounded(self):
        store = self.open_store(durable=False)
        live = queuectl.LiveOutput(limit=100)
        for i in range(50):
            live.add(1, i * 10, b"x" * 10)
        chunks = live.take()
        self.assertEqual(sum(len(c[2]) for c in chunks), 100)
        self.assertEqual(chunks[0][1], 400)
        self.assertEqual(live.take(), [])


class TestPurgeAndRetention(QueueTestCase):
    """purge and the retention setting delete only finished jobs, in batches."""

    def make_jobs(self):
        self.script_text("config", "set", "backoff-max", "0")
        for i in range(3):
            self.script_text("enqueue", "--id", "ok-%d" % i, "--", "echo ok")
        self.script_text("enqueue", "--id", "bad", "--max-retries", "0", "--", "exit 1")
        self.script_text("enqueue", "--id", "later", "--delay", "1h", "--", "true")
        self.script_text("worker", "start", "--once")

    def states(self):
        _, out, _ = self.script_text("list", "--json")
        return {j["id"]: j["state"] for j in json.loads(out)}

    def test_purge_deletes_completed_only_by_default(self):
        self.make_jobs()
        _, _, err = self.script_text("purge")
        self.assertEqual(err, "queuectl: purged 3 completed jobs\n")
        self.assertEqual(self.states(), {"bad": "dead", "later": "pending"})
        self.assertEqual(self.query_one("SELECT COUNT(*) FROM runs WHERE job_id LIKE 'ok-%'"), 0)
        _, out, _ = self.script_text("status", "--json")
        self.assertEqual(json.loads(out)["counts"], {"pending": 1, "processing": 0, "completed": 0,
                                                     "failed": 0, "dead": 1})

    def test_purge_older_than_keeps_recent_jobs(self):
        self.make_jobs()
        _, _, err = self.script_text("purge", "--older-than", "1h", "--state", "completed", "--state", "dead")
        self.assertEqual(err, "queuectl: purged 0 completed jobs, 0 dead jobs\n")
        self.assertEqual(len(self.states()), 5)

    def test_dlq_is_purged_only_when_named(self):
        self.make_jobs()
        self.script_text("purge", "--state", "dead")
        self.assertEqual(set(self.states()), {"ok-0", "ok-1", "ok-2", "later"})

    def test_purge_refuses_waiting_states(self):
        code, out, err = self.script_text("purge", "--state", "pending", check=False)
        self.assertEqual(code, 2)
        self.assertIn("invalid choice: 'pending'", err)

    def test_purge_in_batches(self):
        store = self.open_store()
        store.enqueue([{"command": "true", "cwd": "/"} for _ in range(1200)], now=1000.0)
        wid = queuectl.this_host() + ":1:1"
        store.register_worker(wid)
        result = queuectl.RunResult(0, "exit 0")
        for _ in range(1200):
            job = store.claim(wid, now=1000.0)
            store.finish(job["id"], job["run"], wid, result, now=1000.0)
        self.assertEqual(store.purge(["completed"], before=999.0), 0)
        self.assertEqual(store.purge(["completed"], before=1001.0, batch=500), 1200)
        self.assertEqual(store.counts()["completed"], 0)

    def test_retention_setting_is_applied_by_workers(self):
        self.make_jobs()
        self.script_text("config", "set", "retention", "1s")
        _, out, _ = self.script_text("config", "get", "retention")
        self.assertEqual(out, "1\n")
        finished = time.time()
        self.wait_until(lambda: time.time() > finished + 1.2, 5, "the completed jobs to age")
        self.script_text("worker", "start", "--once")
        self.assertEqual(self.states(), {"bad": "dead", "later": "pending"})


class TestSecurity(QueueTestCase):
    """Job data is only data: terminal escapes are escaped in output and SQL text stays text."""

    def test_control_characters_are_escaped_in_tables(self):
        self.script_text("enqueue", "--id", "esc", "--", "printf '\x1b[2J\x1b]0;pwned\x07'")
        for args in (["list"], ["show", "esc"], ["dlq", "list"], ["status"]):
            _, out, _ = self.script_text(*args)
            self.assertNotIn("\x1b", out, args)
            self.assertNotIn("\x07", out, args)
        _, out, _ = self.script_text("list")
        self.assertIn("\\x1b[2J", out)
        _, out, _ = self.script_text("list", "--json")
        self.assertEqual(json.loads(out)[0]["command"], "printf '\x1b[2J\x1b]0;pwned\x07'")

    def test_worker_log_lines_are_escaped(self):
        self.script_text("enqueue", "--", "true \x1b[31m")
        _, _, err = self.script_text("worker", "start", "--once")
        self.assertNotIn("\x1b", err)
        self.assertIn("\\x1b[31m", err)

    def test_sql_metacharacters_are_data(self):
        command = "echo \"'); DROP TABLE jobs; --\""
        _, out, _ = self.script_text("enqueue", "--", command)
        _, shown, _ = self.script_text("show", out.strip(), "--json")
        self.assertEqual(json.loads(shown)["command"], command)

    def test_network_filesystem_is_refused(self):
        mountinfo = ("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
                     "40 22 0:40 / /mnt/shared\\040disk rw - nfs4 server:/export rw\n")
        with self.assertRaises(queuectl.StoreError) as cm:
            queuectl.check_filesystem("/mnt/shared disk/queue", mountinfo=mountinfo)
        self.assertIn("network file system (nfs4)", str(cm.exception))
        queuectl.check_filesystem("/var/lib/queue", mountinfo=mountinfo)      # ext4: fine
        self.assertEqual(queuectl._mount_fstype("/mnt/shared disk", mountinfo), "nfs4")
        self.assertEqual(queuectl._mount_fstype("/mnt/shared diskette", mountinfo), "ext4")

    def test_network_filesystem_override(self):
        mountinfo = "40 22 0:40 / / rw - nfs server:/export rw\n"
        os.environ["QUEUECTL_ALLOW_NETWORK_FS"] = "1"
        try:
            queuectl.check_filesystem("/anything", mountinfo=mountinfo)
        finally:
            del os.environ["QUEUECTL_ALLOW_NETWORK_FS"]


###############################################################################
# Queues, dependencies, unique jobs ###########################################
###############################################################################

class TestQueues(QueueTestCase):
    """Named queues: their limits, pause and resume, and workers serving only some queues."""

    def test_queue_field_flag_and_list(self):
        a = self.add("true")
        b = self.add("true", queue="thumbs")
        c = self.expect_success("enqueue", "-q", "backups", "--", "true").strip()
        self.assertEqual([self.job(i)["queue"] for i in (a, b, c)], ["default", "thumbs", "backups"])
        self.expect_success("queue", "set", "backups", "--limit", "1", err="queuectl: queue backups limit: 1 running at once\n")
        self.expect_success("queue", "pause", "thumbs", err=None)
        queues = {q["name"]: q for q in json.loads(self.expect_success("queue", "list", "--json"))}
        self.assertEqual(sorted(queues), ["backups", "default", "thumbs"])
        self.assertEqual((queues["backups"]["limit"], queues["backups"]["paused"]), (1, False))
        self.assertEqual((queues["thumbs"]["limit"], queues["thumbs"]["paused"]), (None, True))
        self.assertEqual(queues["default"]["counts"]["pending"], 1)
        self.assertEqual(queues["thumbs"]["counts"], {"pending": 1, "processing": 0, "completed": 0, "failed": 0,
                                                      "dead": 0})
        table = self.expect_success("queue", "list")
        self.assertRegex(table, r"(?m)^thumbs +- +yes +1 +0 +0 +0 +0$")
        self.assertRegex(table, r"(?m)^backups +1 +no +1 ")
        self.assertIn("paused queue: thumbs", self.expect_success("status"))
        self.assertIn("thumbs (paused)", self.expect_success("list"))
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["queues"][2],
                         {"name": "thumbs", "limit": None, "paused": True})
        self.expect_success("queue", "set", "backups", "--limit", "none", err=None)
        self.assertIsNone(json.loads(self.expect_success("queue", "list", "--json"))[0]["limit"])
        self.expect_failure("queue", "resume", "nightly",
                            err="queuectl: error: no queue 'nightly' (queues: backups, default, thumbs)")

    def test_queue_mistakes_are_one_line_and_change_nothing(self):
        self.add("true")
        before = self.db_dump()
        for args, code, err in (
                (("enqueue", "-q", "no space", "--", "true"), 2, "invalid queue name 'no space'"),
                (("enqueue", '{"command": "true", "queue": ""}'), 1, "field 'queue' must be 1-64"),
                (("enqueue", '{"command": "true", "queue": 5}'), 1, "field 'queue' must be 1-64 letters, digits "
                                                                     "and ._- (not starting with - or .), not an integer"),
                (("queue", "set", "a", "--limit", "-1"), 2, "must be at least 1"),
                (("queue", "set", "a"), 2, "required: --limit"),
                (("queue", "pause", ".x"), 2, "invalid queue name '.x'"),
                (("worker", "start", "--queue", "a,,b"), 2, "invalid queue name ''")):
            with self.subTest(args=args):
                code_, out, err_ = self.run_cli(*args)
                self.assertEqual((code_, out), (code, ""))
                self.assertIn(err, err_)
                self.assertEqual(err_.count("\n"), 1, err_)
                self.assertTrue(err_.startswith("queuectl: error: "), err_)
        self.assertEqual(self.db_dump(), before)

    def test_limit_and_pause_in_the_claim(self):
        store = self.open_store(durable=False)
        now = time.time()
        jobs = [queuectl.validate_job({"command": "true", "queue": q, "priority": p}, self.tmp, now)
                for q, p in (("one", 9), ("one", 9), ("p", 8), ("default", 0))]
        one1, one2, paused, plain = store.enqueue(jobs, now=now)
        store.set_queue("one", max_running=1)
        store.set_queue("p", paused=1)
        first = store.claim("h:1:1", now=now)
        self.assertEqual(first["id"], one1)
        # `one` is at its limit and `p` is paused: the priority-0 job comes next.
        self.assertEqual(store.claim("h:2:1", now=now)["id"], plain)
        self.assertIsNone(store.claim("h:3:1", now=now))
        self.assertFalse(store.has_due(now))
        store.finish(one1, first["run"], "h:1:1", queuectl.RunResult(0, "exit 0"), now=now)
        self.assertTrue(store.has_due(now))
        self.assertFalse(store.has_due(now, ["default"]))
        self.assertIsNone(store.claim("h:3:1", now=now, queues=["default", "p"]))
        self.assertEqual(store.claim("h:3:1", now=now, queues=["one"])["id"], one2)
        store.set_queue("p", paused=0)
        self.assertEqual(store.claim("h:4:1", now=now)["id"], paused)

    def test_one_open_queue_keeps_its_limit_pause_and_order(self):
        # With a single queue open to a worker (all in `default`, or a worker
        # serving one queue) the claim reads that queue's head straight from
        # jobs_ready: its limit and pause still hold, and the order is the same.
        store = queuectl.Store(self.db, durable=False)
        self.addCleanup(store.close)
        now = time.time()
        put = lambda p=0, q="default": store.enqueue([queuectl.validate_job(
            {"command": "true", "priority": p, "queue": q}, self.tmp, now)], now=now)[0]
        a, b, c, d = put(), put(), put(5), put()
        store.set_queue("default", max_running=1)
        self.assertEqual(store.claim("h:1:1", now=now)["id"], c)
        self.assertIsNone(store.claim("h:2:1", now=now))
        store.set_queue("default", max_running=None, paused=1)
        self.assertIsNone(store.claim("h:2:1", now=now))
        self.assertIsNone(store.claim("h:2:1", now=now, queues=["default"]))
        store.set_queue("default", paused=0)
        self.assertEqual(store.claim("h:2:1", now=now)["id"], a)
        x = put(9, "x")
        self.assertEqual(store.claim("h:3:1", now=now, queues=["default"])["id"], b)
        store.set_queue("x", max_running=1)
        self.assertEqual(store.claim("h:4:1", now=now, queues=["x", "nightly"])["id"], x)
        self.assertIsNone(store.claim("h:4:1", now=now, queues=["x"]))
        store.set_queue("x", max_running=2)
        self.assertEqual(store.claim("h:5:1", now=now)["id"], d)
        self.assertIsNone(store.claim("h:6:1", now=now))

    def test_limit_one_holds_across_two_pools(self):
        # Four workers in two pools, eight jobs of a limit-1 queue: never two at once.
        self.expect_success("queue", "set", "backups", "--limit", "1", err=None)
        spans = os.path.join(self.tmp, "spans")
        ids = [self.add("echo start $QUEUECTL_JOB_ID $(date +%%s.%%N) >> %s; sleep 0.2; "
                        "echo end $QUEUECTL_JOB_ID $(date +%%s.%%N) >> %s" % (spans, spans), queue="backups")
               for _ in range(8)]
        others = [self.add("sleep 0.1", queue="thumbs") for _ in range(8)]
        self.start_pool("--count", "2")
        self.start_pool("--count", "2")
        for job_id in ids + others:
            self.wait_state(job_id, "completed")
        with open(spans) as f:
            events = [line.split() for line in f]
        self.assertEqual(len(events), 16)
        events.sort(key=lambda e: float(e[2]))
        running = 0
        for what, job_id, _ in events:
            running += 1 if what == "start" else -1
            self.assertLessEqual(running, 1, "two backups jobs ran at once: %s" % events)
        # The other queue ran wide meanwhile: its jobs overlapped.
        runs = [self.job(i)["runs"][0] for i in others]
        spans_ = sorted((iso_to_ts(r["started_at"]), iso_to_ts(r["finished_at"])) for r in runs)
        self.assertTrue(any(b[0] < a[1] for a, b in zip(spans_, spans_[1:])), spans_)

    def test_paused_queue_never_starts_while_others_drain(self):
        self.expect_success("queue", "pause", "slow", err=None)
        held = [self.add(self.ledger_command(), queue="slow") for _ in range(3)]
        free = [self.add(self.ledger_command()) for _ in range(5)]
        self.run_once(count=2)
        self.assertEqual(sorted(self.ledger()), sorted(free))
        self.assertEqual({self.job(i)["state"] for i in held}, {"pending"})
        self.assertEqual(self.job(held[0])["waiting"], "queue slow is paused")
        code, out, err = self.run_cli("wait", held[0], "--timeout", "0.1")
        self.assertEqual(code, 124)
        self.assertIn("job %s: queue slow is paused\n" % held[0], err)
        self.expect_success("queue", "resume", "slow", err=None)
        self.run_once()
        self.assertEqual(sorted(self.ledger()), sorted(free + held))

    def test_worker_serves_only_its_queues(self):
        a = self.add(self.ledger_command(), queue="a")
        b = self.add(self.ledger_command(), queue="b")
        c = self.add(self.ledger_command())
        log = self.run_once_args("--queue", "a,default,nightly")
        self.assertIn("queuectl: note: no job or setting names queue nightly yet\n", log)
        self.assertIn("queues a,default,nightly", log)
        self.assertEqual(sorted(self.ledger()), sorted([a, c]))
        self.assertEqual(self.job(b)["state"], "pending")

    def run_once_args(self, *args):
        code, out, err = self.script("worker", "start", "--once", *args)
        self.assertEqual((code, out), (0, b""), err)
        return err.decode()


class TestQueueMistakes(QueueTestCase):
    """A limit of 0 and a mistyped queue name are errors that change nothing (review of issue 9)."""

    def test_pg_listen_switch_takes_the_usual_words_for_off(self):
        for value, on in (("0", False), ("false", False), ("Off", False), (" no ", False),
                          ("1", True), ("yes", True), ("", True)):
            with self.subTest(value=value), unittest.mock.patch.dict(os.environ, {queuectl.PG_LISTEN_ENV: value}):
                self.assertEqual(queuectl.pg_listen_enabled(), on)

    def test_limit_zero_is_refused_and_an_unknown_queue_is_not_made_by_resume(self):
        self.add("true", queue="thumbs")
        self.expect_failure("queue", "set", "thumbs", "--limit", "0", code=2,
                            err_prefix="queuectl: error: queue set: argument --limit: must be at least 1, not 0")
        self.expect_failure("queue", "resume", "thumbz", err="queuectl: error: no queue 'thumbz' "
                                                             "(queues: default, thumbs)")
        self.expect_failure("queue", "set", "thumbz", "--limit", "none", err_prefix="queuectl: error: no queue")
        self.assertEqual([q["name"] for q in json.loads(self.expect_success("queue", "list", "--json"))],
                         ["default", "thumbs"])
        # A mistyped --db: said so, and no database is made.
        elsewhere = os.path.join(self.tmp, "typo", "queue.db")
        self.expect_failure("--db", elsewhere, "queue", "resume", "thumbs", db=False,
                            err="queuectl: error: no queue 'thumbs': no database at %s yet "
                                "(a mistyped --db or $QUEUECTL_DB?)" % elsewhere)
        self.assertFalse(os.path.exists(os.path.dirname(elsewhere)))
        # Pausing ahead still works, and so does a resume of it after.
        self.expect_success("queue", "pause", "later", err=None)
        self.expect_success("queue", "resume", "later", err="queuectl: queue later resumed\n")


class TestDependencies(QueueTestCase):
    """--after: jobs wait for their dependencies, and the DLQ and dlq retry follow a chain."""

    def test_chain_where_the_middle_job_dies_and_is_retried(self):
        gate = os.path.join(self.tmp, "gate")
        a = self.add(self.ledger_command(), id="a")
        b = self.add(self.ledger_command() + " && test -f %s" % shlex.quote(gate), id="b", after=["a"],
                     max_retries=0)
        c = self.expect_success("enqueue", "--after", "b", "--id", "c", "--", self.ledger_command()).strip()
        d = self.add(self.ledger_command(), id="d", after="c,a")
        self.assertEqual(self.job("c")["waiting"], "waiting for b (pending)")
        self.assertEqual([x["id"] for x in self.job("d")["after"]], ["a", "c"])
        self.run_once()
        self.assertEqual(self.ledger(), [a, b])
        self.assertEqual({i: (self.job(i)["state"], self.job(i)["outcome"]) for i in "abcd"}, {
            "a": ("completed", "exit 0"), "b": ("dead", "exit 1"),
            "c": ("dead", "dependency b dead"), "d": ("dead", "dependency c dead")})
        self.assertEqual(self.job("c")["runs"], [])
        self.assertEqual(self.run_cli("wait", "d"), (1, "", "queuectl: job d is dead (no exit code)\n"))
        with open(gate, "w"):
            pass
        self.expect_failure("dlq", "retry", "c", err="queuectl: error: job 'c' depends on 'b', which is dead: "
                                                     "retry that one (its dependents follow)")
        self.expect_success("dlq", "retry", "b", err=None)
        self.assertEqual({i: self.job(i)["state"] for i in "bcd"}, {"b": "pending", "c": "pending", "d": "pending"})
        self.assertEqual(self.job("d")["waiting"], "waiting for c (pending)")
        self.run_once()
        self.assertEqual(self.ledger(), [a, b, b, c, d])
        self.assertEqual({self.job(i)["state"] for i in "abcd"}, {"completed"})

    def test_dependents_of_a_cancelled_job_go_to_the_dlq(self):
        a = self.add("true", id="a", delay="1h")
        self.add("true", id="b", after=[a])
        self.expect_success("cancel", "a", err=None)
        self.assertEqual((self.job("b")["state"], self.job("b")["outcome"]), ("dead", "dependency a dead"))
        # A job added after a dead one is dead at once, unrun.
        self.expect_success("enqueue", "--id", "c", "--after", "a", "--", "true",
                            err="queuectl: job c went to the DLQ at once: dependency a dead "
                                "(a 'dlq retry' of that one re-arms it)\n")
        self.assertEqual(self.job("c")["outcome"], "dependency a dead")

    def test_a_dependency_that_completed_long_ago_is_no_wait(self):
        self.add("true", id="a")
        self.run_once()
        self.add(self.ledger_command(), id="b", after=["a"])
        self.assertIsNone(self.job("b")["waiting"])
        self.run_once()
        self.assertEqual(self.ledger(), ["b"])

    def test_file_with_dependencies_inside_it_and_cycles(self):
        path = os.path.join(self.tmp, "jobs.jsonl")
        with open(path, "w") as f:
            f.write('{"id": "deploy", "command": "%s", "after": ["build"]}\n' % self.ledger_command())
            f.write('{"id": "build", "command": "%s"}\n' % self.ledger_command())
        self.expect_success("enqueue", "--file", path)
        self.run_once()
        self.assertEqual(self.ledger(), ["build", "deploy"])
        before = self.db_dump()
        with open(path, "w") as f:
            f.write('{"id": "x", "command": "true", "after": ["y"]}\n{"id": "y", "command": "true", "after": ["x"]}\n')
        self.expect_failure("enqueue", "--file", path, err_prefix="queuectl: error: dependency cycle: ")
        for args, err in (
                (("enqueue", "--after", "nope", "--", "true"), "queuectl: error: field 'after': job 'nope' not found"),
                (("enqueue", '{"command": "true", "id": "s", "after": ["s"]}'),
                 "queuectl: error: field 'after': job 's' cannot run after itself"),
                (("enqueue", '{"command": "true", "after": 5}'),
                 "queuectl: error: field 'after' must be a list of job ids, not an integer"),
                (("enqueue", '{"command": "true", "after": ["a b"]}'),
                 "queuectl: error: field 'after': 'a b' is not a job id")):
            with self.subTest(args=args):
                code, out, err_ = self.run_cli(*args)
                self.assertEqual((code, out), (1, ""))
                if "%s" in err:
                    self.assertRegex(err_, "^" + re.escape(err).replace("%s", ".*") + "\n$")
                else:
                    self.assertEqual(err_, err + "\n")
        self.expect_failure("enqueue", "--after", ",", "--", "true", code=2, err_prefix="queuectl: error: ")
        self.assertEqual(self.db_dump(), before)
        # A chain deeper than Python's recursion limit, in one file, in reverse order.
        with open(path, "w") as f:
            for i in reversed(range(2000)):
                f.write(json.dumps(dict({"id": "n%d" % i, "command": "true"},
                                        **({"after": ["n%d" % (i - 1)]} if i else {}))) + "\n")
        self.assertEqual(len(self.expect_success("enqueue", "--file", path).split()), 2000)
        self.assertEqual(self.job("n1999")["waiting"], "waiting for n1998 (pending)")


class TestDependencyDetails(QueueTestCase):
    """after: [] is no dependency; a job born dead says so; `show` lists a purged dependency in one order."""

    def test_empty_after_born_dead_note_and_order_after_purge(self):
        job_id = self.add("true", after=[])
        self.assertEqual(self.job(job_id)["after"], [])
        self.add("exit 1", id="p", max_retries=0)
        self.run_once()
        code, out, err = self.run_cli("enqueue", "--after", "p", "--", "true")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "queuectl: job %s went to the DLQ at once: dependency p dead "
                              "(a 'dlq retry' of that one re-arms it)\n" % out.strip())
        self.add("true", id="a1")
        self.add("true", id="b1", delay="1h")
        self.add("true", id="d1", after=["b1", "a1"])
        self.run_once()
        self.expect_success("purge", err=None)
        self.assertEqual([(x["id"], x["state"]) for x in self.job("d1")["after"]], [("a1", None), ("b1", "pending")])


class TestUniqueJobs(QueueTestCase):
    """--unique KEY adds nothing while a job with that key is active, even under races."""

    def test_the_same_id_and_key_again_is_the_unique_path_not_an_error(self):
        # A cron line with both --id and --unique, run twice.
        self.expect_success("enqueue", "--id", "nightly-1", "--unique", "nightly", "--", "true")
        code, out, err = self.run_cli("enqueue", "--id", "nightly-1", "--unique", "nightly", "--", "true")
        self.assertEqual((code, out), (0, "nightly-1\n"), err)
        self.expect_failure("enqueue", "--id", "nightly-1", "--unique", "other", "--", "true",
                            err="queuectl: error: job 'nightly-1' already exists")
        self.expect_failure("enqueue", "--unique", "", "--", "true", code=2,
                            err_prefix="queuectl: error: enqueue: argument --unique: must be a non-empty string")

    def test_existing_id_is_printed_and_json_says_which(self):
        first = self.expect_success("enqueue", "--unique", "nightly", "--", "true").strip()
        code, out, err = self.run_cli("enqueue", "--unique", "nightly", "--", "true")
        self.assertEqual((code, out), (0, first + "\n"))
        self.assertEqual(err, "queuectl: job %s has unique key nightly and is still active: nothing added\n" % first)
        self.assertEqual(json.loads(self.expect_success("enqueue", "--json", "--unique", "nightly", "--", "true")),
                         [{"id": first, "created": False}])
        self.assertEqual(len(self.jobs()), 1)
        self.assertEqual(self.job(first)["unique"], "nightly")
        self.run_once()
        again = json.loads(self.expect_success("enqueue", "--json", '{"command": "true", "unique": "nightly"}'))
        self.assertTrue(again[0]["created"])
        self.assertNotEqual(again[0]["id"], first)
        self.expect_failure("enqueue", '{"command": "true", "unique": ""}',
                            err="queuectl: error: field 'unique' must be a non-empty string of at most 256 "
                                "characters, not ''")

    def test_a_flag_key_or_id_for_several_jobs_is_refused(self):
        # One key for a whole file would add its first job and silently drop the rest.
        lines = b'{"command": "echo a"}\n{"command": "echo b"}\n'
        self.init_db()
        before = self.db_dump()
        for flag in ("--unique", "--id"):
            self.expect_failure("enqueue", flag, "k1", "--file", "-", stdin=lines, code=2,
                                err='queuectl: error: %s cannot be used with several jobs (give each its own '
                                    '"%s" in the JSON)' % (flag, flag[2:]))
        self.assertEqual(self.db_dump(), before)
        # Keys of their own, in the JSON: fine.
        self.expect_success("enqueue", "--file", "-",
                            stdin=b'{"command": "echo a", "unique": "a"}\n{"command": "echo b", "unique": "b"}\n')
        self.assertEqual(sorted(j["unique"] for j in self.jobs()), ["a", "b"])

    def test_sixteen_concurrent_enqueuers_create_one_job(self):
        self.init_db()
        procs = [self.spawn("enqueue", "--unique", "k", "--", "true", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(16)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=DEADLINE)
            self.assertEqual(p.returncode, 0, err)
            outs.append(out.decode().strip())
        self.assertEqual(len(set(outs)), 1, outs)
        self.assertEqual([j["id"] for j in self.jobs()], outs[:1])


###############################################################################
# The database: location, files, locks, growth, migrations, SQLite builds #####
###############################################################################

@sqlite_only
class TestDatabaseLocation(QueueTestCase):
    """Where the SQLite file lives and how it is opened: paths, permissions, WAL, locks, errors."""

    def assert_private_db(self, path):
        self.assertTrue(os.path.isfile(path), path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        conn = sqlite3.connect(path)
        try:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], queuectl.SCHEMA_VERSION)
        finally:
            conn.close()

    def test_db_option_creates_directories_and_private_file(self):
        path = os.path.join(self.tmp, "a", "b", "c", "queue.db")
        self.db = path
        self.init_db()
        self.assert_private_db(path)
        old_umask = os.umask(0)        # a permissive umask must not widen the file's mode
        self.addCleanup(os.umask, old_umask)
        self.db = os.path.join(self.tmp, "other.db")
        self.init_db()
        self.assert_private_db(self.db)

    def test_every_missing_directory_is_created_private(self):
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        self.db = os.path.join(self.tmp, "a", "b", "c", "queue.db")
        self.init_db()
        for d in ("a", "a/b", "a/b/c"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.tmp, d)).st_mode), 0o700, d)

    def test_symlink_at_the_database_path_is_refused(self):
        victim = os.path.join(self.tmp, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious\n")
        self.db = os.path.join(self.tmp, "q.db")
        os.symlink(victim, self.db)
        err = "queuectl: error: refusing database %s: it is a symbolic link (to %s); give the real path" % (
            self.db, victim)
        self.expect_failure("enqueue", "--", "true", err=err, check_db=False)
        self.expect_failure("status", err=err, check_db=False)
        os.unlink(self.db)
        os.symlink(os.path.join(self.tmp, "nowhere.db"), self.db)      # dangling: not created either
        self.expect_failure("enqueue", "--", "true", err_prefix="queuectl: error: refusing database",
                            check_db=False)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "nowhere.db")))
        with open(victim) as f:
            self.assertEqual(f.read(), "precious\n")

    def test_database_others_may_write_is_refused(self):
        self.init_db()
        before = self.db_dump()
        os.chmod(self.db, 0o606)
        self.expect_failure("status", check_db=False, err=(
            "queuectl: error: refusing database %s: the file is writable by others (mode 0606), so another "
            "user could read your jobs and run commands as you; chmod go-w %s" % (self.db, self.db)))
        # Group write: fine for our own user private group (umask 002 systems), not for another group.
        os.chmod(self.db, 0o660)
        if queuectl._private_group(os.stat(self.db).st_gid):
            self.expect_success("status")
        if os.geteuid() == 0:
            os.chown(self.db, 0, 61003)
            self.expect_failure("status", check_db=False, err_prefix=(
                "queuectl: error: refusing database %s: the file is writable by group (mode 0660)" % self.db))
        os.chmod(self.db, 0o600)
        for suffix in ("-wal", "-shm"):
            companion = self.db + suffix
            fd = os.open(companion, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(companion, 0o606)
            self.expect_failure("enqueue", "--", "true", check_db=False,
                                err_prefix="queuectl: error: refusing database %s: its file %s is writable "
                                "by others (mode 0606)" % (self.db, companion))
            os.unlink(companion)
        shared = os.path.join(self.tmp, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o1777)
        self.db = os.path.join(shared, "q.db")
        self.expect_failure("enqueue", "--", "true", check_db=False, err_prefix=(
            "queuectl: error: refusing database %s: its directory %s is writable by others "
            "(mode 1777)" % (self.db, shared)))
        self.assertEqual(os.listdir(shared), [])
        self.db = os.path.join(self.tmp, "q.db")
        self.assertEqual(self.db_dump(), before)

    def test_database_on_a_read_only_mount_can_be_read(self):
        mnt = mount_tmpfs(self, size="2m")
        self.db = os.path.join(mnt, "q.db")
        job_id = self.add("true", id="ro")
        self.expect_success("config", "set", "retention", "7d", err=None)
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["counts"]["pending"], 1)
        self.assertEqual([j["id"] for j in self.jobs()], [job_id])
        self.assertEqual(self.job(job_id)["command"], "true")
        self.assertEqual(self.expect_success("config", "get", "retention"), "604800\n")
        self.expect_failure("cancel", job_id, check_db=False,
                            err_prefix="queuectl: error: cannot write database %s" % self.db)
        self.expect_failure("enqueue", "--", "true", check_db=False, err_prefix=(
            "queuectl: error: cannot open database %s: Read-only file system" % self.db))
        self.assertEqual(sorted(os.listdir(mnt)), ["q.db"])

    def test_database_file_the_user_may_only_read_can_be_read(self):
        """A 0444 database of one's own (in a directory one may not write
        either): the read commands work, as uid 61002."""
        python = python_for_uid(self, 61002)
        os.chmod(self.tmp, 0o711)
        mine = os.path.join(self.tmp, "mine")
        os.mkdir(mine)
        self.db = os.path.join(mine, "q.db")
        job_id = self.add("true", id="ro")
        for root, dirs, files in os.walk(mine):
            for name in dirs + files + [""]:
                os.chown(os.path.join(root, name), 61002, 61002)
        os.chmod(self.db, 0o444)
        os.chmod(mine, 0o555)
        self.addCleanup(os.chmod, mine, 0o700)
        for args, expected in ((["list", "--json"], job_id), (["status"], "pending     1"), (["show", job_id], "true")):
            r = subprocess.run(as_uid(61002) + [python, QUEUECTL, "--db", self.db] + args, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd="/", env=self.env(), timeout=DEADLINE)
            self.assertEqual((r.returncode, r.stderr), (0, b""), args)
            self.assertIn(expected, r.stdout.decode(), args)

    def test_database_another_user_made_is_refused(self):
        """User A (uid 61001) makes a world-writable directory with a 0666
        database holding a job of theirs; user B (uid 61002) must neither
        enqueue into it nor run A's job as B."""
        python = python_for_uid(self, 61002)
        os.chmod(self.tmp, 0o711)               # others may pass through, not list
        shared = os.path.join(self.tmp, "shared")
        os.mkdir(shared)
        self.db = os.path.join(shared, "queue.db")
        pwned = os.path.join(shared, "pwned")
        self.add("id -u > %s" % shlex.quote(pwned), id="evil")
        for path in (shared, self.db):
            os.chown(path, 61001, 61001)
            os.chmod(path, 0o777 if path == shared else 0o666)
        before = self.db_dump()

        def as_b(*args):
            return subprocess.run(as_uid(61002) + [python, QUEUECTL, "--db", self.db] + list(args),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                                  env=self.env(XDG_DATA_HOME=os.path.join(shared, "xdg")), timeout=DEADLINE)

        for args in (["enqueue", "--", "echo secret-token"], ["worker", "start", "--once"], ["list"]):
            r = as_b(*args)
            self.assertEqual(r.returncode, 1, (args, r.stderr))
            self.assertEqual(r.stdout, b"", args)
            self.assertEqual(r.stderr.decode(), (
                "queuectl: error: refusing database %s: its directory %s belongs to uid 61001, not to you "
                "(uid 61002), so another user could read your jobs and run commands as you; use a database "
                "in a directory of your own\n" % (self.db, shared)), args)
        os.chown(shared, 0, 0)      # a directory only root may write, A's file: still refused
        os.chmod(shared, 0o755)
        r = as_b("worker", "start", "--once")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stderr.decode(), (
            "queuectl: error: refusing database %s: the file belongs to uid 61001, not to you (uid 61002), "
            "so another user could read your jobs and run commands as you; use a database in a directory "
            "of your own\n" % self.db))
        self.assertFalse(os.path.exists(pwned), "A's job ran as B")
        self.assertEqual(self.db_dump(), before)

    def test_db_option_anywhere_on_the_line(self):
        out = self.expect_success("enqueue", "--db", self.db, '{"command": "true", "id": "j1"}', db=False)
        self.assertEqual(out, "j1\n")
        self.assertEqual(self.expect_success("list", "--db", self.db, "--json", db=False).count('"j1"'), 1)

    def test_queuectl_db_environment_variable(self):
        path = os.path.join(self.tmp, "env", "queue.db")
        os.environ["QUEUECTL_DB"] = path
        self.assertEqual(self.expect_success("enqueue", '{"command": "true", "id": "e1"}', db=False), "e1\n")
        self.assert_private_db(path)
        # --db wins over the environment.
        self.init_db()
        self.assertEqual(json.loads(self.expect_success("list", "--json"))[:1], [])
        env_jobs = json.loads(self.expect_success("list", "--json", db=False))
        self.assertEqual([j["id"] for j in env_jobs], ["e1"])

    def test_xdg_data_home_and_home_defaults(self):
        xdg = os.path.join(self.tmp, "xdg")
        os.environ["XDG_DATA_HOME"] = xdg
        self.expect_success("config", "set", "max_retries", "2", db=False, err=None)
        self.assert_private_db(os.path.join(xdg, "queuectl", "queue.db"))
        del os.environ["XDG_DATA_HOME"]
        home = os.path.join(self.tmp, "home")
        os.environ["HOME"] = home
        self.expect_success("config", "set", "max_retries", "2", db=False, err=None)
        self.assert_private_db(os.path.join(home, ".local", "share", "queuectl", "queue.db"))

    def test_read_commands_do_not_create_the_database(self):
        """They read an empty queue, and say on stderr that there is no
        database there (a mistyped --db), still exiting 0 for scripts."""
        self.db = os.path.join(self.tmp, "new", "queue.db")
        note = "queuectl: no database at %s yet, so the queue is empty (a mistyped --db or $QUEUECTL_DB?)\n" \
            % self.db
        status = json.loads(self.expect_success("status", "--json", err=note))
        self.assertEqual((status["counts"], status["workers"]), ({s: 0 for s in STATES}, []))
        self.assertEqual(json.loads(self.expect_success("list", "--json", err=note)), [])
        self.assertEqual(json.loads(self.expect_success("dlq", "list", "--json", err=note)), [])
        self.assertEqual(self.expect_success("config", "get", "max-retries", err=note), "3\n")
        self.assertEqual(json.loads(self.expect_success("stats", "--json", err=note))["last_hour"]["completed"], 0)
        self.assertEqual(self.expect_success("status", err=None).count("\n"), 8)
        self.expect_success("worker", "stop", err=note + "queuectl: no workers running\n")
        missing = "(there is no database at %s)" % self.db
        for args in (["show", "x"], ["wait", "x"], ["logs", "x"], ["cancel", "x"], ["dlq", "retry", "x"]):
            self.expect_failure(*args, err="queuectl: error: job 'x' not found %s" % missing)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "new")), "a read command created files")

    def test_empty_db_option_is_a_usage_error(self):
        os.environ["QUEUECTL_DB"] = self.db
        self.init_db()
        before = self.db_dump()
        for args in (["status"], ["enqueue", "--", "true"], ["worker", "start", "--once"], ["init"]):
            self.expect_failure("--db", "", *args, code=2, db=False, err=(
                "queuectl: error: --db needs a path, not an empty string (leave it out to use $QUEUECTL_DB "
                "or the default)"))
        self.assertEqual(self.db_dump(), before)

    def test_version(self):
        self.assertEqual(self.expect_success("--version", db=False), "queuectl %s\n" % queuectl.__version__)

    def test_a_url_that_is_not_postgresql_is_refused_not_made_a_file(self):
        """A mistyped scheme (pg://, mysql://, POSTGRESQL://, postgresql:/) is one line, exit 1,
        without the password, and no SQLite file named after the URL appears."""
        before = sorted(os.listdir(self.tmp))
        for db, says in (("pg://postgres:s3cret@127.0.0.1/x", "unsupported database URL pg://postgres:***@"),
                         ("mysql://u:s3cret@h/db", "unsupported database URL"),
                         ("postgressql://u:s3cret@h/db", "unsupported database URL"),
                         ("POSTGRESQL://postgres:s3cret@127.0.0.1/x", "malformed PostgreSQL URL"),
                         ("postgresql:/postgres@127.0.0.1/x", "malformed PostgreSQL URL"),
                         ("postgresql:postgres@127.0.0.1", "malformed PostgreSQL URL")):
            for args in (("enqueue", "--", "true"), ("status",), ("worker", "start", "--once")):
                code, out, err = self.script(*args, db=db)
                err = err.decode()
                self.assertEqual((code, out), (1, b""), err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("queuectl: error: " + says, err)
                self.assertNotIn("s3cret", err)
        self.assertEqual(sorted(os.listdir(self.tmp)), before)
        # A file name with a colon is still a file.
        self.expect_success("enqueue", "--", "true", db=os.path.join(self.tmp, "backup:2026.db"))

    def test_usage_errors_exit_2(self):
        self.expect_failure("bogus", code=2, db=False)
        self.expect_failure("worker", code=2)
        self.expect_failure("worker", "start", "--count", "0", code=2)
        self.expect_failure("list", "--limit", "-1", code=2)
        self.expect_failure("list", "--limit", "ten", code=2)
        self.expect_failure("wait", code=2)
        self.expect_failure("enqueue", "--priority", "high", "--", "true", code=2)

    def test_huge_integer_options_are_usage_errors(self):
        job_id = self.add("true")
        self.run_once()
        huge = "99999999999999999999"
        for args in (["list", "-n", huge], ["logs", job_id, "-a", huge],
                     ["enqueue", "-p", huge, "--", "true"], ["enqueue", "-p", "-" + huge, "--", "true"],
                     ["enqueue", "-r", huge, "--", "true"]):
            with self.subTest(args=args):
                line = self.expect_failure(*args, code=2)
                self.assertIn(" (at most 9223372036854775807)" if "-" + huge not in args else
                              "must be at least -9223372036854775808", line)
        self.assertEqual(self.expect_success("list", "-n", str(2 ** 63 - 1), "--json").count('"id"'), 1)

    def test_database_errors_are_one_line(self):
        os.mkdir(os.path.join(self.tmp, "adir"))
        self.db = os.path.join(self.tmp, "adir")
        self.expect_failure("status", err="queuectl: error: cannot open database %s: it is a directory"
                            % self.db, check_db=False)
        self.db = os.path.join(self.tmp, "garbage.db")
        with open(self.db, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        self.expect_failure("status", check_db=False,
                            err="queuectl: error: %s is not a queuectl database (file is not a database)"
                            % self.db)
        self.db = os.path.join(self.tmp, "foreign.db")
        conn = sqlite3.connect(self.db)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        self.expect_failure("list", err="queuectl: error: %s is not a queuectl database (it has other tables)"
                            % self.db, check_db=False)

    def test_lock_held_too_long_is_one_clear_error(self):
        self.add("true", id="before")
        os.environ["QUEUECTL_BUSY_TIMEOUT"] = "0.3"
        conn = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(conn.execute, "ROLLBACK")
        started = time.monotonic()
        line = self.expect_failure("enqueue", '{"command": "true"}')
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertTrue(line.startswith("queuectl: error: database %s is locked" % self.db), line)
        self.assertNotIn("database is locked", line.replace("database %s is locked" % self.db, ""))

    def test_newer_schema_is_refused(self):
        self.init_db()
        conn = sqlite3.connect(self.db)
        conn.execute("PRAGMA user_version = %d" % (queuectl.SCHEMA_VERSION + 1))
        conn.commit()
        conn.close()
        self.expect_failure("list", err="queuectl: error: database %s was written by a newer queuectl "
                            "(schema %d, this is %d); upgrade queuectl"
                            % (self.db, queuectl.SCHEMA_VERSION + 1, queuectl.SCHEMA_VERSION))

    def test_contention_waits_instead_of_database_locked(self):
        self.init_db()
        conn = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO config (key, value) VALUES ('max_retries', '7')")
        timer = threading.Timer(0.6, conn.execute, ("COMMIT",))
        timer.start()
        self.addCleanup(timer.join)
        started = time.monotonic()
        job_id = self.add("true")
        self.assertGreaterEqual(time.monotonic() - started, 0.4, "enqueue did not wait for the lock")
        self.assertEqual(self.job(job_id)["max_retries"], 7)

    def test_database_and_directory_are_private(self):
        db = os.path.join(self.tmp, "new", "dir", "q.db")
        old = os.umask(0o022)
        try:
            self.script_text("enqueue", "--", "true", db=db)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(db).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(db)).st_mode), 0o700)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(db + suffix).st_mode) & 0o077, 0)

    def test_schema_version_and_wal(self):
        store = self.open_store()
        self.assertEqual(store.conn.execute("PRAGMA user_version").fetchone()[0],
                         queuectl.SCHEMA_VERSION)
        self.assertGreaterEqual(queuectl.SCHEMA_VERSION, 1)
        self.assertEqual(store.conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        # A write transaction leaves the timeout at 0 (see Store._begin); the
        # store's next statement outside one runs with it set again.
        with store.transaction():
            pass
        self.assertEqual(store._one("PRAGMA busy_timeout")[0], int(store.busy_timeout * 1000))


@sqlite_only
class BusyTimeoutTest(QueueTestCase):
    """Another SQLite process holds the write lock: queuectl waits, or fails in one line."""

    def hold_lock(self, seconds):
        """A process that holds BEGIN IMMEDIATE on the database for `seconds`."""
        code = ("import sqlite3, sys, time\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN IMMEDIATE')\n"
                "c.execute(\"UPDATE config SET value = value WHERE key = 'none'\")\n"
                "print('locked', flush=True)\n"
                "time.sleep(float(sys.argv[2]))\n"
                "c.execute('COMMIT')\n")
        proc = subprocess.Popen([sys.executable, "-c", code, self.db, str(seconds)],
                                stdout=subprocess.PIPE)
        self.addCleanup(lambda: (proc.kill(), proc.wait(timeout=10), proc.stdout.close()))
        self.assertEqual(proc.stdout.readline(), b"locked\n")
        return proc

    def setUp(self):
        super().setUp()
        self.script_text("enqueue", "--id", "first", "--", "true")

    def test_enqueue_waits_for_a_lock_released_in_time(self):
        holder = self.hold_lock(1.5)
        t0 = time.monotonic()
        code, out, err = self.script("enqueue", "--id", "second", "--", "true",
                            env=self.env(QUEUECTL_BUSY_TIMEOUT="20"))
        waited = time.monotonic() - t0
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, b"second\n")
        self.assertGreater(waited, 1.0, "enqueue did not wait for the lock")
        self.assertEqual(holder.wait(timeout=10), 0)
        self.assertIn("second", self.jobs_by_id())

    def test_lock_held_past_the_timeout_fails_in_one_line(self):
        before = self.db_dump()
        holder = self.hold_lock(60)     # far longer than the checks take, even on a busy machine
        for args in (("enqueue", "--", "true"), ("config", "set", "max_retries", "7"),
                     ("cancel", "first")):
            t0 = time.monotonic()
            code, out, err = self.script(*args, env=self.env(QUEUECTL_BUSY_TIMEOUT="0.5"))
            with self.subTest(args=args):
                self.assertLess(time.monotonic() - t0, 2.0, "the busy timeout was not applied")
                self.assertEqual(code, 1)
                self.assertEqual(out, b"")
                lines = err.decode().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertRegex(lines[0], r"^queuectl: error: database .* is locked")
        # Reads do not need the write lock (WAL).
        code, out, err = self.script("list", env=self.env(QUEUECTL_BUSY_TIMEOUT="0.5"))
        self.assertEqual(code, 0, err)
        self.assertIsNone(holder.poll(), "the lock was released before the checks ended")
        holder.kill()       # its (empty) transaction is rolled back
        holder.wait(timeout=10)
        self.assertEqual(self.db_dump(), before)

    def test_worker_rides_out_a_lock_held_past_its_busy_timeout(self):
        # A heartbeat that cannot get the lock is not a lost lease: the lease
        # has 30 s left. The job must finish once, its result recorded.
        job = self.script_text("enqueue", "--", self.ledger_job("sleep 3"))[1].strip()
        pool = self.start_pool(count=1, env={"QUEUECTL_BUSY_TIMEOUT": "0.5"})
        self.wait_until(lambda: self.ledger_lines(), 15, "the job to start")
        # Held across the worker's first heartbeat (HEARTBEAT_SECONDS = 2 s
        # after its start), for longer than its busy timeout.
        holder = self.hold_lock(2.5)
        self.assertEqual(holder.wait(timeout=10), 0)
        self.wait_until(lambda: self.jobs_by_id()[job]["state"] not in ("pending", "processing"), 20,
                   "the job to finish")
        row = self.jobs_by_id()[job]
        self.assertEqual((row["state"], row["attempts"]), ("completed", 1))
        self.assertEqual(len(self.ledger_lines()), 2, "the job ran more than once")
        self.assertNotIn("died", self.pool_log(pool))

    @sqlite_only
    def test_a_heartbeat_stuck_past_the_lease_deadline_kills_the_job_anyway(self):
        # The heartbeat waits for the lock far longer than it does (as on a disk that hangs):
        # LEASE_GIVE_UP_SECONDS after the last renewal the worker's watchdog kills the job while
        # the heartbeat still waits, and the run is recorded as 'lease lost' once it returns.
        # (A worker in this process, to shorten the deadline: 4 s instead of 15.)
        pidfile = os.path.join(self.tmp, "pid")
        job = self.script_text("enqueue", "--", "echo $$ > %s; exec sleep 60" % shlex.quote(pidfile))[1].strip()
        log = []
        with mock.patch.object(queuectl, "HEARTBEAT_BUSY_MS", 60000), \
                mock.patch.object(queuectl, "LEASE_GIVE_UP_SECONDS", 4.0):
            worker = queuectl.Worker(self.db, once=True, log=log.append)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            pid = self.wait_until(lambda: int(read_file(pidfile) or 0), 15, "the job to start")
            holder = self.hold_lock(60)
            locked_at = time.monotonic()
            self.wait_until(lambda: _process_gone(pid), 10, "the job to be killed")
            self.assertLess(time.monotonic() - locked_at, 4.0 + 1.0)
            self.assertIsNone(holder.poll(), "the lock was released before the job was killed")
            holder.kill()
            holder.wait(timeout=10)
            thread.join(timeout=30)
            self.assertFalse(thread.is_alive(), "the worker did not finish: %s" % log)
        runs = [(r["run"], r["outcome"]) for r in self.query("SELECT run, outcome FROM runs WHERE job_id = ?", job)]
        self.assertEqual(runs, [(1, "lease lost")], log)
        self.assertTrue(any("lease not renewed" in line for line in log), log)


@sqlite_only
class TestStoreLocks(QueueTestCase):
    """A process with two Stores on one file (the dashboard) keeps its SQLite locks."""

    def test_opening_a_second_store_keeps_the_first_ones_locks(self):
        """Opening a Store used to close a descriptor of the file, dropping every POSIX lock this
        process held on it: another process closing then deleted the WAL under the first Store."""
        self.init_db()
        first = self.open_store()
        first.counts()
        self.open_store().close()
        code = subprocess.call([sys.executable, "-c", "import sqlite3, sys; "
                                "sqlite3.connect(sys.argv[1]).execute('SELECT 1 FROM jobs').fetchall()", self.db])
        self.assertEqual(code, 0)
        self.assertTrue(os.path.exists(self.db + "-wal"), "the WAL was deleted under an open Store")
        first.set_config("max_retries", 5)
        self.assertEqual(self.expect_success("config", "get", "max_retries"), "5\n")


@sqlite_only
class TestGrowth(QueueTestCase):
    """The WAL stays bounded while a pool runs, and a long reader does not stall the pool."""

    def test_wal_stays_bounded_while_a_pool_runs(self):
        """Each job writes 20 KB of output into the database; with 600 of
        them (12 MB) the WAL must still be truncated back after checkpoints."""
        jobs = os.path.join(self.tmp, "jobs.jsonl")
        with open(jobs, "w") as f:
            for _ in range(600):
                f.write(json.dumps({"command": "head -c 20000 /dev/zero"}) + "\n")
        self.script_text("enqueue", "--file", jobs)
        pool = self.start_pool(count=2)
        wal = self.db + "-wal"
        biggest = [0]

        def done():
            if os.path.exists(wal):
                biggest[0] = max(biggest[0], os.path.getsize(wal))
            conn = sqlite3.connect(self.db)
            try:
                return conn.execute("SELECT n FROM counts WHERE state = 'completed'").fetchone()[0] == 600
            finally:
                conn.close()

        self.wait_until(done, 120, "600 jobs to complete")
        pool.terminate()
        pool.wait(timeout=30)
        self.assertGreater(os.path.getsize(self.db), 10 * 1024 * 1024)
        # A worker checks after each job: the WAL may pass the limit by what
        # the jobs in flight wrote (20 KB each here), not by another 4 MB.
        self.assertLessEqual(biggest[0], queuectl.WAL_SIZE_LIMIT + 1024 * 1024)


    def test_a_long_reader_does_not_stall_the_pool(self):
        """A reader that keeps an old snapshot (an open sqlite3 shell, a
        backup) keeps the WAL from being truncated. Workers must then back
        off instead of holding every writer up for 0.1 s after each job: 300
        jobs would take 30 s more; they take about one."""
        jobs = os.path.join(self.tmp, "jobs.jsonl")
        with open(jobs, "w") as f:
            for _ in range(300):
                f.write(json.dumps({"command": "head -c 20000 /dev/zero"}) + "\n")
        self.script_text("enqueue", "--file", jobs)
        reader = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()
        t0 = time.monotonic()
        self.script_text("worker", "start", "--once", "--count", "2", timeout=120)
        took = time.monotonic() - t0
        self.assertGreater(os.path.getsize(self.db + "-wal"), queuectl.WAL_SIZE_LIMIT)
        self.assertLess(took, 20, "the pool stalled behind the reader")
        reader.execute("COMMIT")
        # Once the reader is gone, the next job's checkpoint truncates it.
        self.script_text("enqueue", "--", "true")
        self.script_text("worker", "start", "--once")
        self.assertLessEqual(os.path.getsize(self.db + "-wal"), queuectl.WAL_SIZE_LIMIT)


@sqlite_only
class TestMigrations(QueueTestCase):
    """Databases written by older queuectl (schema v1, v2) are migrated in place and keep working."""

    def copy_fixture(self, name="v1", fixture=FIXTURE_V1):
        path = self.new_db(name)
        copy_fixture(path, fixture)
        return path

    def user_version(self, db):
        return self.query_one("PRAGMA user_version", db=db)

    def test_fixture_is_schema_v1(self):
        self.assertEqual(self.user_version(FIXTURE_V1), 1)

    def test_v1_database_is_migrated_in_place(self):
        db = self.copy_fixture()
        _, out, _ = self.script_text("list", "--json", db=db)
        jobs = {j["id"]: j for j in json.loads(out)}
        self.assertEqual(self.user_version(db), queuectl.SCHEMA_VERSION)
        self.assertEqual({i: j["state"] for i, j in jobs.items()}, {
            "done-1": "completed", "dead-1": "dead", "fail-1": "failed",
            "pending-1": "pending", "sched-1": "pending"})
        self.assertEqual(jobs["dead-1"]["attempts"], 2)
        _, out, _ = self.script_text("logs", "dead-1", db=db)
        _, _, err = self.script_text("logs", "dead-1", db=db)
        self.assertEqual(err, "oops\n")
        _, out, _ = self.script_text("config", "get", "max-retries", db=db)
        self.assertEqual(out, "5\n")

    def test_migrated_database_keeps_numbering_runs(self):
        db = self.copy_fixture()
        self.script_text("config", "set", "backoff-max", "0", db=db)
        self.script_text("dlq", "retry", "dead-1", db=db)
        self.script_text("worker", "start", "--once", db=db)
        _, out, _ = self.script_text("show", "dead-1", "--json", db=db)
        runs = json.loads(out)["runs"]
        self.assertEqual([r["run"] for r in runs], [1, 2, 3, 4])
        self.assertEqual([r["attempt"] for r in runs], [1, 2, 1, 2])
        _, out, _ = self.script_text("show", "fail-1", "--json", db=db)
        self.assertEqual([r["run"] for r in json.loads(out)["runs"]], [1, 2, 3])
        _, out, _ = self.script_text("show", "pending-1", "--json", db=db)
        self.assertEqual(json.loads(out)["state"], "completed")

    def test_fixture_v2_is_schema_v2(self):
        self.assertEqual(self.user_version(FIXTURE_V2), 2)

    def assert_staged(self, db):
        """Schema 3+: the claim's indexes exist and nothing is ready that is not claimable."""
        conn = sqlite3.connect(db)
        try:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            self.assertLessEqual({"jobs_ready", "jobs_waiting", "jobs_state"}, indexes)
            self.assertNotIn("jobs_due", indexes)
            self.assertEqual(conn.execute("""
                SELECT COUNT(*) FROM jobs WHERE ready = 1 AND state NOT IN ('pending', 'failed')""").fetchone()[0], 0)
        finally:
            conn.close()

    def test_v2_database_is_migrated_and_waiting_jobs_stay_waiting(self):
        db = self.copy_fixture("v2", FIXTURE_V2)
        _, out, _ = self.script_text("list", "--json", db=db)
        jobs = {j["id"]: j for j in json.loads(out)}
        self.assertEqual(self.user_version(db), queuectl.SCHEMA_VERSION)
        self.assert_staged(db)
        self.assertEqual({i: j["state"] for i, j in jobs.items()}, {
            "done-1": "completed", "dead-1": "dead", "backoff-1": "failed", "retry-1": "failed",
            "due-1": "pending", "sched-1": "pending"})
        self.assertEqual(jobs["sched-1"]["run_at"], "2100-01-01T00:00:00.000Z")
        self.assertEqual(jobs["backoff-1"]["run_at"], "2100-01-01T00:00:00.000Z")
        _, out, _ = self.script_text("status", "--json", db=db)
        self.assertEqual(json.loads(out)["counts"],
                         {"pending": 2, "processing": 0, "completed": 1, "failed": 2, "dead": 1})
        # The due jobs run, in priority order; the ones waiting for 2100 do not.
        _, _, err = self.script_text("worker", "start", "--once", db=db)
        self.assertLess(err.index("retry-1 claimed"), err.index("due-1 claimed"), err)
        _, out, _ = self.script_text("list", "--json", db=db)
        states = {j["id"]: j["state"] for j in json.loads(out)}
        self.assertEqual(states, {"done-1": "completed", "dead-1": "dead", "backoff-1": "failed",
                                  "retry-1": "completed", "due-1": "completed", "sched-1": "pending"})
        _, out, _ = self.script_text("show", "retry-1", "--json", db=db)
        self.assertEqual([r["run"] for r in json.loads(out)["runs"]], [1, 2])
        self.script_text("dlq", "retry", "dead-1", db=db)
        self.script_text("worker", "start", "--once", db=db)
        _, out, _ = self.script_text("show", "dead-1", "--json", db=db)
        self.assertEqual(json.loads(out)["state"], "completed")
        self.assertEqual([r["run"] for r in json.loads(out)["runs"]], [1, 2])
        self.assert_staged(db)

    def test_v1_database_due_jobs_are_claimed_after_migration(self):
        db = self.copy_fixture()
        self.script_text("status", db=db)
        self.assertEqual(self.user_version(db), queuectl.SCHEMA_VERSION)
        self.assert_staged(db)
        # Every waiting job of the fixture is long due: the first claim promotes
        # them all, and they run by priority (pending-1 is priority 5).
        _, _, err = self.script_text("worker", "start", "--once", db=db)
        claimed = re.findall(r" (\S+) claimed", err)
        self.assertEqual(claimed[0], "pending-1", err)
        self.assertEqual(sorted(claimed), ["fail-1", "pending-1", "sched-1"], err)
        self.assert_staged(db)

    def test_two_processes_migrating_at_once(self):
        db = self.copy_fixture()
        procs = [self.spawn("status", "--json", db=db, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, err)
            self.assertEqual(json.loads(out)["counts"]["pending"], 2)
        self.assertEqual(self.user_version(db), queuectl.SCHEMA_VERSION)
        conn = sqlite3.connect(db)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(conn.execute("SELECT run_count FROM jobs WHERE id = 'dead-1'").fetchone()[0], 2)
        conn.close()

    def test_newer_schema_is_refused(self):
        db = self.copy_fixture()
        self.script_text("status", db=db)
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        before = self.db_dump(db)
        code, out, err = self.script_text("enqueue", "--", "true", check=False, db=db)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertRegex(err, r"^queuectl: error: database .* was written by a newer queuectl "
                              r"\(schema 99, this is \d+\); upgrade queuectl\n$")
        self.assertEqual(self.db_dump(db), before)

    def test_foreign_sqlite_database_is_refused(self):
        conn = sqlite3.connect(self.db)
        conn.execute("CREATE TABLE dogs (name TEXT)")
        conn.commit()
        conn.close()
        before = self.db_dump()
        code, out, err = self.script_text("status", check=False)
        self.assertEqual(code, 1)
        self.assertEqual(err, "queuectl: error: %s is not a queuectl database (it has other tables)\n" % self.db)
        self.assertEqual(self.db_dump(), before)

    def test_v1_database_is_migrated(self):
        copy_fixture(self.db)
        jobs = {j["id"]: j for j in self.jobs()}
        self.assertEqual(sorted(jobs), ["dead-1", "done-1", "fail-1", "pending-1", "sched-1"])
        self.assertEqual((jobs["dead-1"]["state"], jobs["dead-1"]["attempts"]), ("dead", 2))
        self.assertEqual(self.user_version(self.db), queuectl.SCHEMA_VERSION)
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["counts"],
                         {"pending": 2, "processing": 0, "completed": 1, "failed": 1, "dead": 1})
        self.assertEqual(self.expect_success("config", "get", "max_retries"), "5\n")
        self.assertEqual(self.expect_success("logs", "done-1"), "done one\n")
        self.assertEqual([r["run"] for r in self.job("dead-1")["runs"]], [1, 2])
        # The old jobs keep working: a retried one continues its run numbering.
        self.expect_success("dlq", "retry", "dead-1", err=None)
        self.expect_success("cancel", "pending-1", "sched-1", "fail-1", err=None)
        new = self.add("true")
        self.run_once()
        self.assertEqual(self.job(new)["state"], "completed")
        self.assertEqual([r["run"] for r in self.job("dead-1")["runs"]], [1, 2, 3])
        counts = json.loads(self.expect_success("status", "--json"))["counts"]
        self.assertEqual(sum(counts.values()), 6)
        self.assertEqual(counts["completed"], 2)


@sqlite_only
class TestSQLiteBuild(unittest.TestCase):
    """The SQLite build CI asked for (QUEUECTL_EXPECT_SQLITE) is the one the suite runs against."""

    def test_expected_sqlite_is_loaded(self):
        """CI runs the suite against old SQLite builds with LD_PRELOAD; make
        sure the one it asked for is the one answering."""
        want = os.environ.get("QUEUECTL_EXPECT_SQLITE")
        if not want:
            self.skipTest("QUEUECTL_EXPECT_SQLITE not set (CI sets it for the old-SQLite runs)")
        self.assertEqual(sqlite3.sqlite_version, want)


###############################################################################
# How jobs run, retries and backoff: the Store and pure helpers ###############
###############################################################################

class TestStore(QueueTestCase):
    """The Store with injected time: claim order, leases, attempts, backoff, DLQ and counts."""

    T = 1800000000.0
    W = "otherhost:4242:99"      # a worker on another host: only its lease can expire

    def setUp(self):
        super().setUp()
        self.store = self.open_store()

    def put(self, now=None, **fields):
        now = self.T if now is None else now
        fields.setdefault("command", "true")
        job = queuectl.validate_job(fields, self.tmp, now)
        return self.store.enqueue([job], now=now)[0]

    def fail_run(self, job, now, code=3):
        return self.store.finish(job["id"], job["run"], self.W, queuectl.RunResult(code, "exit %d" % code),
                                 now=now)

    def assert_counts_consistent(self):
        actual = {s: 0 for s in STATES}
        for row in self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            actual[row["state"]] = row["n"]
        self.assertEqual(self.store.counts(), actual)

    def test_claim_order_priority_then_due_time_then_enqueue_order(self):
        a = self.put(priority=0)
        b = self.put(priority=5)
        c = self.put(priority=-1)
        d = self.put(priority=10, now=self.T + 1)
        e = self.put(priority=5, now=self.T - 5)   # same priority as b, due earlier
        f = self.put(priority=5)                   # same priority and due time as b, enqueued later
        g = self.put(priority=0)
        order = []
        while True:
            job = self.store.claim(self.W, now=self.T + 2)
            if job is None:
                break
            order.append(job["id"])
        self.assertEqual(order, [d, e, b, f, a, g, c])

    def test_waiting_jobs_join_the_claim_order_when_due(self):
        # Jobs that become due later (a delay, a retry's backoff) are claimed
        # in exactly the order of jobs that were due all along.
        a = self.put(priority=0)
        b = self.put(priority=5, delay=10)
        c = self.put(priority=5, delay=5)
        d = self.put(priority=5)
        e = self.put(priority=9, delay=30)
        retried = self.put(priority=5, max_retries=1, now=self.T - 10)
        job = self.store.claim(self.W, now=self.T - 10)
        self.assertEqual(job["id"], retried)
        self.assertEqual(self.fail_run(job, self.T - 9), ("failed", self.T - 9 + 2))   # due at T - 7
        self.assertTrue(self.store.has_due(self.T))
        order = []
        while True:
            job = self.store.claim(self.W, now=self.T + 20)
            if job is None:
                break
            order.append(job["id"])
        # e is not due at T + 20; the retry is due earliest among priority 5.
        self.assertEqual(order, [retried, d, c, b, a])
        self.assertFalse(self.store.has_due(self.T + 29.9))
        self.assertTrue(self.store.has_due(self.T + 30))
        self.assertEqual(self.store.get(e)["state"], "pending")
        self.assertEqual(self.store.claim(self.W, now=self.T + 30)["id"], e)
        self.assert_counts_consistent()

    def test_jobs_due_during_a_drain_are_claimed_on_time(self):
        # A busy worker claims its next job in the transaction that records
        # the last one, and one read of that claim says whether a waiting job
        # is due: a scheduled job and a retry that become due while the
        # worker drains are taken as soon as they are due (by priority), not
        # once the queue is empty. The scheduled one comes from another
        # connection, which commits while this one holds no transaction.
        ok = queuectl.RunResult(0, "exit 0")
        other = self.open_store()
        plain = [self.put() for _ in range(5)]
        retried = self.put(priority=3, max_retries=1, now=self.T - 10)
        job = self.store.claim(self.W, now=self.T - 10)
        self.assertEqual(job["id"], retried)
        self.assertEqual(self.fail_run(job, self.T), ("failed", self.T + 2))
        job = self.store.claim(self.W, now=self.T)
        self.assertEqual(job["id"], plain[0])
        later = other.enqueue([queuectl.validate_job({"command": "true", "priority": 5, "delay": 5},
                                                     self.tmp, self.T)], now=self.T)[0]
        order = [job["id"]]
        for now in (self.T + 1, self.T + 1.9, self.T + 2, self.T + 4.9, self.T + 5, self.T + 6, self.T + 7):
            _, job = self.store.finish(job["id"], job["run"], self.W, ok, now=now, claim_next=True)
            order.append(job and job["id"])
        self.assertEqual(order, [plain[0], plain[1], plain[2], retried, plain[3], later, plain[4], None])
        self.assert_counts_consistent()

    def waiting_store(self, kind, n):
        """A store holding n priority-10 jobs that a claim at T cannot take
        (`kind` says why), then one due job of priority 0; returns (store, due id)."""
        store = self.open_store(self.new_db("%s-%d" % (kind, n)), durable=False)
        if kind == "scheduled":             # for tomorrow
            job = queuectl.validate_job({"command": "true", "priority": 10, "delay": 86400}, self.tmp, self.T)
            store.enqueue([job] * n, now=self.T)
        elif kind == "failed":              # waiting out a 1000 s backoff
            store.set_config("backoff_base", 1000.0)
            job = queuectl.validate_job({"command": "true", "priority": 10}, self.tmp, self.T - 10)
            store.enqueue([job] * n, now=self.T - 10)
            with store.transaction():       # one transaction: 20,000 commits would take long
                for _ in range(n):
                    claimed = store._claim(self.W, self.T - 5, queuectl.LEASE_SECONDS)
                    store._finish(claimed["id"], claimed["run"], self.W, queuectl.RunResult(1, "exit 1"),
                                  self.T - 5, False)
            self.assertEqual(store.counts()["failed"], n)
        elif kind == "paused":              # in a paused queue
            job = queuectl.validate_job({"command": "true", "priority": 10, "queue": "p"}, self.tmp, self.T)
            store.enqueue([job] * n, now=self.T)
            store.set_queue("p", paused=1)
        elif kind == "blocked":             # waiting for a dependency that is not done
            [parent] = store.enqueue([queuectl.validate_job({"command": "true", "delay": 86400}, self.tmp,
                                                            self.T)], now=self.T)
            job = queuectl.validate_job({"command": "true", "priority": 10, "after": [parent]}, self.tmp, self.T)
            store.enqueue([job] * n, now=self.T)
        elif kind == "limited":             # in a queue running as many jobs as its limit allows
            store.set_queue("l", max_running=1)
            job = queuectl.validate_job({"command": "true", "priority": 10, "queue": "l"}, self.tmp, self.T)
            store.enqueue([job] * (n + 1), now=self.T)
            self.assertEqual(store.claim(self.W, now=self.T)["queue"], "l")
        else:
            raise AssertionError(kind)
        due = store.enqueue([queuectl.validate_job({"command": "true"}, self.tmp, self.T)], now=self.T)[0]
        return store, due

    @sqlite_only
    def test_claim_cost_does_not_grow_with_jobs_it_cannot_take(self):
        # Issue 13: a claim used to walk every not-yet-due job of a higher
        # priority before reaching a due one. Counted in SQLite VM steps (the
        # same on every SQLite version, unlike a query plan's text), for the
        # idle check, the claim and the job's result.
        def steps(store, due):
            count = [0]

            def tick():
                count[0] += 1
                return 0
            store.conn.set_progress_handler(tick, 1)
            try:
                self.assertTrue(store.has_due(self.T))
                job = store.claim(self.W, now=self.T)
                self.assertEqual(job["id"], due)
                store.finish(due, job["run"], self.W, queuectl.RunResult(0, "exit 0"), now=self.T)
            finally:
                store.conn.set_progress_handler(None, 1)
            return count[0]

        for kind in ("scheduled", "failed", "paused", "blocked", "limited"):
            with self.subTest(kind=kind):
                small = steps(*self.waiting_store(kind, 10))
                big = steps(*self.waiting_store(kind, 20000))
                self.assertLessEqual(big, small + 20, "claim beside 20,000 %s jobs: %d VM steps, beside 10: %d"
                                     % (kind, big, small))

    def test_job_not_claimed_before_run_at(self):
        job_id = self.put(delay=60)
        self.assertIsNone(self.store.claim(self.W, now=self.T + 59.9))
        self.assertEqual(self.store.get(job_id)["state"], "pending")
        self.assertEqual(self.store.claim(self.W, now=self.T + 60)["id"], job_id)

    def test_claim_is_a_lease_and_counts_the_attempt(self):
        job_id = self.put()
        job = self.store.claim(self.W, now=self.T)
        row = self.store.get(job_id)
        self.assertEqual((row["state"], row["attempts"], row["worker_id"]), ("processing", 1, self.W))
        self.assertEqual(row["lease_until"], self.T + queuectl.LEASE_SECONDS)
        self.assertEqual(job["attempts"], 1)
        self.assertIsNone(self.store.claim("me:1:1", now=self.T), "a processing job was claimed twice")
        self.assert_counts_consistent()

    def test_backoff_then_dead_after_max_retries_plus_one_runs(self):
        job_id = self.put(max_retries=3)
        now, runs = self.T, 0
        expected_delays = [2, 4, 8]         # backoff_base 2 ** k for failed run k
        while True:
            job = self.store.claim(self.W, now=now)
            if job is None:
                break
            runs += 1
            self.assertEqual(job["attempts"], runs)
            now += 1
            state, run_at = self.fail_run(job, now)
            if runs <= 3:
                self.assertEqual(state, "failed")
                self.assertEqual(run_at, now + expected_delays[runs - 1])
                self.assertEqual(self.store.get(job_id)["state"], "failed")
                self.assertIsNone(self.store.claim(self.W, now=run_at - 0.01), "retried too early")
                now = run_at
            else:
                self.assertEqual(state, "dead")
        self.assertEqual(runs, 4)
        row = self.store.get(job_id)
        self.assertEqual((row["state"], row["attempts"], row["exit_code"], row["outcome"]),
                         ("dead", 4, 3, "exit 3"))
        self.assertEqual([r["outcome"] for r in self.store.runs(job_id)], ["exit 3"] * 4)
        self.assert_counts_consistent()

    def test_backoff_respects_configured_base_and_max(self):
        self.store.set_config("backoff_base", 3.0)
        self.store.set_config("backoff_max", 5.0)
        self.put(max_retries=5)
        job = self.store.claim(self.W, now=self.T)
        self.assertEqual(self.fail_run(job, self.T + 1), ("failed", self.T + 1 + 3))
        job = self.store.claim(self.W, now=self.T + 10)
        self.assertEqual(self.fail_run(job, self.T + 11), ("failed", self.T + 11 + 5))

    def test_max_retries_zero_means_one_run(self):
        self.put(max_retries=0)
        job = self.store.claim(self.W, now=self.T)
        self.assertEqual(self.fail_run(job, self.T)[0], "dead")

    def test_success_completes(self):
        job_id = self.put()
        job = self.store.claim(self.W, now=self.T)
        result = queuectl.RunResult(0, "exit 0", b"out", b"err")
        state, _ = self.store.finish(job_id, job["run"], self.W, result, now=self.T + 1)
        self.assertEqual(state, "completed")
        row = self.store.get(job_id)
        self.assertEqual((row["state"], row["exit_code"], row["worker_id"]), ("completed", 0, None))
        self.assertEqual(self.store.run_output(job_id), (1, True, b"out", b"err"))

    def test_expired_lease_is_reclaimed_as_a_failed_attempt(self):
        job_id = self.put(max_retries=1)
        job = self.store.claim(self.W, now=self.T)
        [lease] = self.store.leases()
        self.assertEqual((lease["id"], lease["worker_id"], lease["run"]), (job_id, self.W, 1))
        self.assertIsNone(self.store.reclaim(job_id, self.W, 1, False, now=self.T + 29))
        # The holder renews its lease while the command runs.
        self.store.heartbeat(self.W, job_id, now=self.T + 20)
        self.assertIsNone(self.store.reclaim(job_id, self.W, 1, False, now=self.T + 31))
        state, run_at = self.store.reclaim(job_id, self.W, 1, False, now=self.T + 50)
        self.assertEqual((state, run_at), ("failed", self.T + 50 + 2))
        row = self.store.get(job_id)
        self.assertEqual((row["state"], row["attempts"], row["outcome"], row["worker_id"]),
                         ("failed", 1, "worker lost", None))
        self.assertEqual(self.store.runs(job_id)[0]["outcome"], "worker lost")
        # The old holder's late result does not overwrite the truth.
        self.assertIsNone(self.store.finish(job_id, 1, self.W, queuectl.RunResult(0, "exit 0"),
                                            now=self.T + 51))
        self.assertEqual(self.store.get(job_id)["state"], "failed")
        # A job that keeps losing its worker ends in the DLQ.
        job = self.store.claim("w2:1:1", now=run_at)
        self.assertEqual(self.store.reclaim(job_id, "w2:1:1", job["run"], True, now=run_at)[0], "dead")
        self.assert_counts_consistent()

    def test_a_silent_worker_of_another_host_is_lost_and_forgotten_once_its_leases_expire(self):
        lease = queuectl.LEASE_SECONDS
        self.store.register_worker(self.W, now=self.T)
        job_id = self.put()
        self.assertEqual(self.store.claim(self.W, now=self.T + 1)["id"], job_id)   # after its last beat
        [w] = self.store.workers()
        self.assertEqual(self.store.judge_worker(w, self.T + lease - 0.5), "alive")
        self.assertEqual(self.store.judge_worker(w, self.T + lease), "lost")
        # Its job's lease runs until T + 1 + lease: the row stays until then.
        self.assertEqual(self.store.request_stop(now=self.T + lease), ([], [dict(w, stop_requested=1)]))
        self.assertEqual([w["id"] for w in self.store.workers()], [self.W])
        self.store.forget_workers(lost=[self.W], now=self.T + 1 + lease)
        self.assertEqual(self.store.workers(), [])
        # One heard of again since is not forgotten.
        self.store.register_worker(self.W, now=self.T + 2 * lease)
        self.store.heartbeat(self.W, now=self.T + 3 * lease - 1)
        self.store.forget_workers(lost=[self.W], now=self.T + 3 * lease)
        self.assertEqual([w["id"] for w in self.store.workers()], [self.W])

    def test_holder_liveness(self):
        host, boot = queuectl.this_host(), queuectl.this_boot_id()
        me = os.getpid()
        proc = subprocess.Popen(["true"])
        proc.wait()
        for one_host in (True, False):      # an SQLite file; a PostgreSQL server shared by hosts
            def liveness(*args):
                return queuectl.holder_liveness(*args, reboot_proves_death=one_host)
            self.assertEqual(liveness(host, boot, me, queuectl.process_start(me)), "alive")
            self.assertEqual(liveness(host, boot, proc.pid, 12345), "dead")
            # Same pid, different start time: the pid was reused, the holder is gone.
            self.assertEqual(liveness(host, boot, me, queuectl.process_start(me) + 1), "dead")
            # Another host: we cannot tell, only its lease can expire.
            self.assertEqual(liveness(host + "-other", boot, proc.pid, 12345), "unknown")
            # Another container on this kernel: its pids are not ours.
            self.assertEqual(liveness(host, boot.partition("/")[0] + "/pid:[1]", proc.pid, 12345), "unknown")
            if boot.partition("/")[0]:
                # Another boot of this host name: this machine rebooted, or another machine has
                # the same name, which only a database shared by hosts can see.
                self.assertEqual(liveness(host, "another-boot/" + boot.partition("/")[2], me,
                                          queuectl.process_start(me)), "dead" if one_host else "unknown")

    def test_interrupted_run_gives_the_attempt_back(self):
        job_id = self.put(max_retries=0)
        job = self.store.claim(self.W, now=self.T)
        state, _ = self.store.finish(job_id, job["run"], self.W, queuectl.RunResult(None, "interrupted"),
                                     now=self.T + 1, interrupted=True)
        self.assertEqual(state, "pending")
        row = self.store.get(job_id)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))
        self.assertEqual(self.store.runs(job_id)[0]["outcome"], "interrupted")

    def test_cancel(self):
        waiting = self.put()
        running = self.put()
        done = self.put()
        for _ in range(2):
            self.store.claim(self.W, now=self.T)
        # `running` and `waiting` (first two) are processing; make `done` completed.
        job = self.store.claim("w3:1:1", now=self.T)
        self.store.finish(done, job["run"], "w3:1:1", queuectl.RunResult(0, "exit 0"), now=self.T)
        self.store.finish(waiting, 1, self.W, queuectl.RunResult(1, "exit 1"), now=self.T)  # failed
        self.assertEqual(self.store.cancel([waiting, running], now=self.T + 1),
                         {waiting: "dead", running: "cancelling"})
        self.assertEqual(self.store.get(waiting)["outcome"], "cancelled")
        self.assertEqual(self.store.heartbeat(self.W, running, now=self.T + 2), (False, True, True))
        state, _ = self.store.finish(running, 1, self.W, queuectl.RunResult(None, "cancelled"),
                                     now=self.T + 3)
        self.assertEqual(state, "dead")
        with self.assertRaisesRegex(queuectl.QueueError, "already completed"):
            self.store.cancel([done])
        self.assert_counts_consistent()

    def test_retry_dead_is_all_or_nothing(self):
        dead = self.put(max_retries=0)
        pending = self.put()
        job = self.store.claim(self.W, now=self.T)
        self.fail_run(job, self.T)
        with self.assertRaises(queuectl.QueueError):
            self.store.retry_dead([dead, pending], now=self.T + 5)
        self.assertEqual(self.store.get(dead)["state"], "dead")
        self.assertEqual(self.store.retry_dead([dead], now=self.T + 5), [dead])
        row = self.store.get(dead)
        self.assertEqual((row["state"], row["attempts"], row["run_at"]), ("pending", 0, self.T + 5))
        self.assert_counts_consistent()

    def test_transaction_rolls_back_on_error(self):
        with self.assertRaises(RuntimeError):
            with self.store.transaction():
                self.store._execute("INSERT INTO config (key, value) VALUES ('max_retries', '9')")
                raise RuntimeError("boom")
        self.assertEqual(self.store.config()["max_retries"], 3)

    def test_duplicate_id_in_one_enqueue_writes_nothing(self):
        jobs = [queuectl.validate_job({"id": "x", "command": "true"}, self.tmp, self.T)] * 2
        with self.assertRaises(queuectl.QueueError):
            self.store.enqueue(jobs, now=self.T)
        self.assertEqual(self.store.list_jobs(), [])


class TestHelpers(unittest.TestCase):
    """Pure helpers (durations, times, backoff, ids, job validation) give the documented values."""


    def test_a_jobs_database_url_carries_no_password(self):
        # A job's QUEUECTL_DB: libpq would take a password in the URL (even ***) over
        # ~/.pgpass and PGPASSWORD, so it is left out, not masked.
        for url, mark in (("postgresql://u:secret@h/db", "postgresql://u@h/db"),
                          ("postgresql://u:s@h/db?password=x&sslmode=require", "postgresql://u@h/db?sslmode=require"),
                          ("postgres://h/db?sslmode=require&password=x", "postgres://h/db?sslmode=require"),
                          ("postgresql://u@h/db?options=-csearch_path%3Dq", "postgresql://u@h/db?options=-csearch_path%3Dq")):
            self.assertEqual(queuectl.db_mark(url), mark)
        # libpq takes a password up to the "@", "?" and "#" included: so does the mask.
        for url, shown in (("postgresql://u:s3c?r#t@h/db", "postgresql://u:***@h/db"),
                           ("postgresql://u:s3c/ret@h:5432/db?password=x", "postgresql://u:***@h:5432/db?password=***")):
            self.assertEqual(queuectl.redact_url(url), shown)
            self.assertEqual(queuectl.db_mark(url).split("@")[0], "postgresql://u")
    def test_parse_duration(self):
        cases = {"30": 30, "1.5": 1.5, "30s": 30, "10m": 600, "2h": 7200, "1d": 86400,
                 " 10M ": 600, "0": 0, 45: 45, 2.5: 2.5}
        for text, seconds in cases.items():
            with self.subTest(text=text):
                self.assertEqual(queuectl.parse_duration(text), seconds)
        for text in ("-5", -1, "abc", "", "10x", "s", "nan", "inf", True, "1e400"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                queuectl.parse_duration(text)

    def test_backoff_delay(self):
        self.assertEqual(queuectl.backoff_delay(1, 2, 3600), 2)
        self.assertEqual(queuectl.backoff_delay(3, 2, 3600), 8)
        self.assertEqual(queuectl.backoff_delay(12, 2, 3600), 3600)
        self.assertEqual(queuectl.backoff_delay(5, 1, 3600), 1)
        self.assertEqual(queuectl.backoff_delay(2, 3, 3600), 9)
        self.assertEqual(queuectl.backoff_delay(4, 2, 0), 0)
        self.assertEqual(queuectl.backoff_delay(10 ** 6, 2, 60), 60)   # no OverflowError

    def test_new_job_id_unique_sortable_short(self):
        ids = [queuectl.new_job_id() for _ in range(5000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(ids, sorted(ids))
        for job_id in ids[:50]:
            self.assertTrue(queuectl.valid_job_id(job_id), job_id)
            self.assertLessEqual(len(job_id), 16)
        later = queuectl.new_job_id()
        self.assertGreater(later, ids[-1])

    def test_cut_marker_counts_bytes_in_words(self):
        for data, marker in ((b"abcde", b"1 byte"), (b"abcdef", b"2 bytes")):
            capture = queuectl._Capture(4)
            capture.feed(data)
            self.assertEqual(capture.value(), data[:2] + b"\n[... queuectl: %s cut ...]\n" % marker + data[-2:])

    def test_time_edge_cases(self):
        parse, fmt = queuectl.parse_time, queuectl.format_time
        self.assertEqual(parse("2030-01-01T05:59:00+05:59"), 1893456000.0)
        for text in ("2030-01-01T00:00:00+05:60", "2030-01-01T00:00:00+0560", "2030-01-01T00:00:00-00:99",
                     "2030-01-01T00:00:00+24:00", "9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59.9999Z",
                     "0001-01-01T00:00:00+05:00"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                parse(text)
        for text in ("0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z", "0999-03-04T05:06:07.890Z"):
            self.assertEqual(fmt(parse(text)), text)
        # Naive times are local: in a zone west of UTC, the last second of 9999 is in 10000 UTC.
        with mock.patch.dict(os.environ, TZ="EST5"):
            time.tzset()
            try:
                with self.assertRaises(ValueError):
                    parse("9999-12-31T23:59:59")
                self.assertEqual(queuectl.format_local(parse("0001-01-02T03:04:05")), "0001-01-02 03:04:05")
            finally:
                os.environ.pop("TZ")
                time.tzset()

    def test_parse_time(self):
        t = 1893456000.0        # 2030-01-01T00:00:00Z
        self.assertEqual(queuectl.parse_time("2030-01-01T00:00:00Z"), t)
        self.assertEqual(queuectl.parse_time("2030-01-01T02:00:00+02:00"), t)
        self.assertEqual(queuectl.parse_time("2030-01-01T00:00:00.250Z"), t + 0.25)
        for text in ("tomorrow", "2030-13-01T00:00:00", "", 5):
            with self.subTest(text=text), self.assertRaises(ValueError):
                queuectl.parse_time(text)

    def test_parse_time_accepts_iso8601_forms_on_every_python(self):
        # Valid ISO-8601 that datetime.fromisoformat only accepts from Python 3.11 on: the
        # contract says ISO-8601, and the same job file must work on every supported Python.
        t = 1893456000.0
        for text, expected in (("2030-01-01T00:00:00.5Z", t + 0.5),
                               ("2030-01-01T02:00:00+0200", t)):
            with self.subTest(text=text):
                try:
                    self.assertEqual(queuectl.parse_time(text), expected)
                except ValueError as e:
                    self.fail("rejected on Python %d.%d: %s" % (sys.version_info[:2] + (e,)))

    def test_format_time_is_iso_utc(self):
        self.assertEqual(iso_to_ts(queuectl.format_time(1893456000.25)), 1893456000.25)
        self.assertIsNone(queuectl.format_time(None))

    def test_default_db_path(self):
        home = os.path.expanduser("~")
        self.assertEqual(queuectl.default_db_path({}),
                         os.path.join(home, ".local", "share", "queuectl", "queue.db"))
        self.assertEqual(queuectl.default_db_path({"XDG_DATA_HOME": "/x"}), "/x/queuectl/queue.db")
        self.assertEqual(queuectl.default_db_path({"XDG_DATA_HOME": "/x", "QUEUECTL_DB": "/y.db"}), "/y.db")

    def test_validate_job(self):
        now = 1000.0
        job = queuectl.validate_job({"command": "true", "delay": "10m", "priority": -3}, "/w", now)
        self.assertEqual(job["command"], "true")
        self.assertEqual(job["cwd"], "/w")
        self.assertEqual(job["run_at"], now + 600)
        self.assertEqual(job["priority"], -3)
        bad = [{"command": "x", "prio": 1}, {"command": ""}, {}, [], {"command": "x", "max_retries": -1},
               {"command": "x", "timeout": 0}, {"command": "x", "delay": 1, "run_at": "2030-01-01"},
               {"command": "a\0b"}, {"command": "x", "id": "has space"}]
        for obj in bad:
            with self.subTest(obj=obj), self.assertRaises(ValueError):
                queuectl.validate_job(obj, "/w", now)


###############################################################################
# Dashboard: a real server, over HTTP, and in a real browser ##################
###############################################################################

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


#: urllib without redirects (a 303 is an answer to check) and without any proxy.
_HTTP = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
_URL_LINE = re.compile(r"^http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{32,})$")


class Dashboard:
    """A `queuectl.py --db DB dashboard --port 0` process: its port, token and stderr."""

    def __init__(self, test, db, *args, env=None, python_flags=()):
        self.err_path = os.path.join(test.tmp, "dashboard%d.err" % random.randrange(10 ** 9))
        err = open(self.err_path, "wb")
        self.proc = test.spawn("dashboard", "--port", "0", *args, db=db, env=env, python_flags=python_flags,
                               stdout=subprocess.PIPE,
                               stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        err.close()
        test.addCleanup(self.stop)
        self.line = self._first_line(test)
        m = re.match(r"^http://([^/]+):(\d+)/\?token=([A-Za-z0-9_-]+)$", self.line)
        test.assertTrue(m, "first line is not the dashboard's URL: %r\n%s" % (self.line, self.stderr()))
        self.port = int(m.group(2))
        self.token = m.group(3)
        self.host = "127.0.0.1:%d" % self.port
        self.base = "http://" + self.host
        self.cookie = "queuectl_%d=%s" % (self.port, self.token)

    def _first_line(self, test):
        import select
        deadline = time.monotonic() + DEADLINE
        data = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                test.fail("the dashboard printed no URL within %gs\n%s" % (DEADLINE, self.stderr()))
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    test.fail("the dashboard exited (%s) before printing its URL\n%s" % (
                        self.proc.wait(5), self.stderr()))
                data += chunk
        return data.split(b"\n")[0].decode()

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, sig=signal.SIGTERM):
        """Stop it with `sig` (then SIGKILL at the deadline); returns its exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                kill_session(self.proc.pid)
                self.proc.wait(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def request(self, path, method="GET", data=None, headers=None, auth="cookie", origin=True):
        """(status, headers, body bytes). auth: 'cookie', 'bearer' or None; origin: send our
        own Origin on POST (or the given string, or None for none)."""
        all_headers = {}
        if auth == "cookie":
            all_headers["Cookie"] = self.cookie
        elif auth == "bearer":
            all_headers["Authorization"] = "Bearer " + self.token
        if method == "POST":
            if origin is True:
                all_headers["Origin"] = self.base
            elif origin:
                all_headers["Origin"] = origin
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
            if isinstance(data, (dict, list)):
                data = urllib.parse.urlencode(data, doseq=True).encode()
            data = data or b""
        all_headers.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, headers=all_headers, method=method)
        try:
            with _HTTP.open(req, timeout=DEADLINE) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get(self, path, **kw):
        status, headers, body = self.request(path, **kw)
        if status != 200:
            raise AssertionError("GET %s: %d %r" % (path, status, body[:500]))
        return body.decode("utf-8")

    def get_json(self, path, **kw):
        return json.loads(self.get(path, **kw))

    def post(self, path, data, **kw):
        return self.request(path, method="POST", data=data, **kw)


def parse_prometheus(text):
    """{(name, frozenset(labels.items())): value}; fails on any line not in the text format."""
    samples, types = {}, {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*")*)\})? (-?[0-9.eE+]+|\+Inf|NaN)$')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        m = line_re.match(line)
        if not m:
            raise AssertionError("not Prometheus text format: %r" % line)
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', m.group(3) or ""))
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or base in types, "sample without # TYPE: %r" % line
        samples[(m.group(1), labels)] = float(m.group(5))
    return samples


class DashboardTestCase(QueueTestCase):
    """Helpers: start a real dashboard; make dead jobs with real workers."""

    def dashboard(self, *args, db=None, python_flags=()):
        return Dashboard(self, db or self.db, *args, python_flags=python_flags)

    def dead_jobs(self, *commands):
        """Enqueue each command with no retries, run a worker once; returns the ids (now dead)."""
        ids = [self.add(c, max_retries=0) for c in commands]
        self.run_once()
        for job_id in ids:
            self.assertEqual(self.job(job_id)["state"], "dead")
        return ids


class TestDashboardServer(DashboardTestCase):
    """`queuectl dashboard` over HTTP: the security defaults, the API and /metrics, each as a user meets it."""

    def test_first_line_is_the_url_with_the_real_port_and_it_listens_on_loopback_only(self):
        """Port 0 prints the real port; the socket listens on 127.0.0.1 alone; no warning."""
        dash = self.dashboard()
        self.assertRegex(dash.line, _URL_LINE)
        self.assertNotEqual(dash.port, 0)
        with open("/proc/net/tcp") as f:
            listening = [line.split() for line in f if line.split()[3:4] == ["0A"]]
        mine = [fields[1] for fields in listening if fields[1].endswith(":%04X" % dash.port)]
        self.assertEqual(mine, ["0100007F:%04X" % dash.port])
        self.assertEqual(dash.get("/healthz", auth=None), "ok\n")
        self.assertNotIn("warning", dash.stderr())

    def test_another_address_needs_host_and_warns(self):
        """--host 0.0.0.0 serves but says on stderr that other machines can reach it."""
        dash = self.dashboard("--host", "0.0.0.0")
        self.assertIn("warning: the dashboard listens on 0.0.0.0", dash.stderr())
        self.assertEqual(dash.get("/healthz", auth=None), "ok\n")

    def test_every_request_but_healthz_needs_the_token(self):
        """No token, a wrong cookie, a wrong ?token= or Bearer on a page: 401, and nothing leaks."""
        self.add("echo secret-command")
        dash = self.dashboard()
        for path in ("/", "/jobs", "/dlq", "/api/status", "/api/jobs", "/metrics", "/events", "/static/app.js",
                     "/jobs/nope", "/confirm/retry"):
            for auth in (None, "wrong"):
                headers = {"Cookie": "%s=%s" % (dash.cookie.split("=")[0], "x" * 43)} if auth else {}
                status, headers_out, body = dash.request(path, auth=None, headers=headers)
                self.assertEqual(status, 401, path)
                self.assertNotIn(b"secret-command", body)
        status, headers, _ = dash.request("/api/status", auth=None)
        self.assertEqual(headers["WWW-Authenticate"], 'Bearer realm="queuectl"')
        self.assertEqual(dash.request("/?token=" + "A" * 43, auth=None)[0], 401)
        self.assertEqual(dash.request("/", auth="bearer")[0], 401)       # Bearer is for /api and /metrics
        self.assertEqual(dash.request("/metrics", auth="bearer")[0], 200)
        self.assertEqual(dash.request("/api/status", auth="bearer")[0], 200)
        self.assertEqual(dash.request("/healthz", auth=None)[0], 200)

    def test_token_in_the_url_once_becomes_an_httponly_strict_cookie(self):
        """?token= answers 303 to the same URL without it, setting an HttpOnly SameSite=Strict cookie."""
        dash = self.dashboard()
        status, headers, _ = dash.request("/jobs?state=dead&token=" + dash.token, auth=None)
        self.assertEqual(status, 303)
        self.assertEqual(headers["Location"], "/jobs?state=dead")
        cookie = headers["Set-Cookie"]
        self.assertTrue(cookie.startswith(dash.cookie + ";"), cookie)
        attrs = [a.strip() for a in cookie.split(";")[1:]]
        self.assertIn("HttpOnly", attrs)
        self.assertIn("SameSite=Strict", attrs)
        self.assertIn("Path=/", attrs)
        self.assertEqual(dash.request("/jobs?state=dead")[0], 200)

    def test_foreign_host_header_is_refused(self):
        """DNS rebinding: any Host but this dashboard's own names gets 403, even with the token."""
        self.add("echo x")
        dash = self.dashboard()
        for host in ("evil.example:%d" % dash.port, "evil.example", "127.0.0.1:1", "127.0.0.1.evil.example"):
            status, _, body = dash.request("/api/status", headers={"Host": host})
            self.assertEqual(status, 403, host)
            self.assertNotIn(b"counts", body)
        self.assertEqual(dash.request("/api/status", headers={"Host": "localhost:%d" % dash.port})[0], 200)
        status, _, _ = dash.request("/healthz", auth=None, headers={"Host": "evil.example"})
        self.assertEqual(status, 403)

    def test_cross_origin_or_tokenless_post_is_refused_and_changes_nothing(self):
        """Actions need the token, Origin equal to our own and Sec-Fetch-Site same-origin when sent."""
        [job_id] = self.dead_jobs("exit 3")
        dash = self.dashboard()
        before = self.db_dump()
        form = {"one": job_id, "back": "/dlq"}
        attempts = [
            ({"origin": None}, 403),
            ({"origin": "http://evil.example"}, 403),
            ({"origin": "http://localhost:%d" % dash.port}, 403),      # another origin, even if local
            ({"origin": "null"}, 403),
            ({"origin": "null", "headers": {"Sec-Fetch-Site": "cross-site"}}, 403),
            ({"origin": "http://evil.example", "headers": {"Sec-Fetch-Site": "same-origin"}}, 403),
            ({"headers": {"Sec-Fetch-Site": "cross-site"}}, 403),
            ({"headers": {"Sec-Fetch-Site": "same-site"}}, 403),
            ({"auth": None}, 401),
            ({"auth": None, "headers": {"Cookie": dash.cookie.split("=")[0] + "=" + "B" * 43}}, 401),
        ]
        for kw, code in attempts:
            for path in ("/actions/retry", "/actions/retry-matching", "/actions/purge", "/actions/cancel",
                         "/actions/worker-stop", "/actions/queue-pause", "/actions/queue-resume"):
                status, _, _ = dash.post(path, dict(form, state="dead", upto="999", queue="default"), **kw)
                self.assertEqual(status, code, (path, kw))
        self.assertEqual(self.db_dump(), before)
        status, headers, _ = dash.post("/actions/retry", form, headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(status, 303)
        self.assertEqual(headers["Location"], "/dlq?done=retried&n=1")
        self.assertEqual(self.job(job_id)["state"], "pending")
        # A browser posting our own form: no-referrer makes it send "Origin: null".
        self.expect_success("cancel", job_id, err=None)
        status, _, _ = dash.post("/actions/retry", form, origin="null", headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(status, 303)
        self.assertEqual(self.job(job_id)["state"], "pending")

    def test_get_never_changes_anything(self):
        """GET on action URLs answers 405; confirmation pages only count; the database is unchanged."""
        ids = self.dead_jobs("exit 3", "exit 3")
        self.add("echo pending")
        dash = self.dashboard()
        before = self.db_dump()
        query = "?one=%s&sel=%s&state=dead&state=completed&older_than=0&g=1&outcome=exit+3&exit=3&upto=999" \
            "&queue=default" % (ids[0], ids[1])
        for path in ("/actions/retry", "/actions/retry-matching", "/actions/purge", "/actions/cancel",
                     "/actions/worker-stop", "/actions/queue-pause", "/actions/queue-resume"):
            status, headers, _ = dash.request(path + query)
            self.assertEqual(status, 405, path)
            self.assertEqual(headers["Allow"], "POST")
        for path in ("/confirm/retry", "/confirm/purge", "/confirm/worker-stop", "/dlq", "/jobs", "/"):
            dash.get(path + query)
        self.assertIn("2 jobs", dash.get("/confirm/retry" + query))
        self.assertEqual(self.db_dump(), before)

    def test_security_headers_and_no_inline_code_on_every_response(self):
        """CSP default-src 'none' (script and style from 'self' only), nosniff, no-referrer, no framing."""
        self.dead_jobs("exit 3")
        dash = self.dashboard()
        pages = ["/", "/jobs", "/dlq", "/confirm/retry", "/confirm/purge", "/jobs/nope", "/api/status",
                 "/metrics", "/static/app.css", "/static/app.js", "/healthz"]
        for path in pages + ["/no-token"]:
            status, headers, body = dash.request(path, auth=None if path == "/no-token" else "cookie")
            csp = headers["Content-Security-Policy"]
            self.assertIn("default-src 'none'", csp)
            self.assertIn("frame-ancestors 'none'", csp)
            self.assertIn("script-src 'self'", csp)
            self.assertNotIn("unsafe", csp)
            self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
            self.assertEqual(headers["Referrer-Policy"], "no-referrer")
            if headers["Content-Type"].startswith("text/html"):
                html = body.decode()
                self.assertNotRegex(html, r"<script(?![^>]*\ssrc=)", path)     # no inline script
                self.assertNotRegex(html, r"<style|\sstyle=|\son[a-z]+=", path)  # no inline style/handlers
        self.assertEqual(dash.request("/jobs/nope")[0], 404)

    def test_job_data_is_escaped_and_output_has_no_terminal_escapes(self):
        """Markup in a command and its output is shown as text on every page; ANSI codes are stripped."""
        evil = "<img src=x onerror=alert(1)><script>alert(2)</script>"
        [job_id] = self.dead_jobs("echo '%s'; printf '\\033[31mred\\033[0m\\n' >&2; exit 3" % evil)
        dash = self.dashboard()
        for path in ("/", "/jobs", "/jobs?q=script", "/dlq", "/jobs/" + job_id, "/jobs/%s?fragment=output" % job_id,
                     "/dlq?fragment=list", "/confirm/retry?g=1&outcome=exit+3&exit=3"):
            html = dash.get(path)
            self.assertNotIn("<img", html, path)
            self.assertNotIn("<script>", html, path)
            self.assertNotIn("\x1b", html, path)
        page = dash.get("/jobs/" + job_id)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;", page)
        self.assertIn('<pre class="output">red\n</pre>', page)

    def test_raw_output_download_is_a_text_plain_attachment(self):
        """The raw link gives the stored bytes, unescaped, as an attachment (never rendered)."""
        [job_id] = self.dead_jobs("printf '<b>out</b>\\033[1m'; printf 'err' >&2; exit 3")
        dash = self.dashboard()
        status, headers, body = dash.request("/jobs/%s/runs/1/stdout" % job_id)
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain")
        self.assertEqual(headers["Content-Disposition"], 'attachment; filename="%s-run1.stdout.txt"' % job_id)
        self.assertEqual(body, b"<b>out</b>\x1b[1m")
        self.assertEqual(dash.request("/jobs/%s/runs/1/stderr" % job_id)[2], b"err")
        self.assertEqual(dash.request("/jobs/%s/runs/7/stdout" % job_id)[0], 400)

    def test_api_has_the_same_fields_as_the_cli_json(self):
        """/api/status, /api/jobs/ID, /api/jobs and /api/stats equal status/show/list/stats --json."""
        ids = self.dead_jobs("echo one; exit 3")
        ids.append(self.add("echo two", priority=2))
        dash = self.dashboard()
        self.assertEqual(dash.get_json("/api/status"), json.loads(self.expect_success("status", "--json")))
        for job_id in ids:
            self.assertEqual(dash.get_json("/api/jobs/" + job_id), self.job(job_id))
        api = dash.get_json("/api/jobs?limit=500")
        self.assertEqual(api["jobs"], list(reversed(self.jobs())))
        self.assertIsNone(api["next_before"])
        stats = dash.get_json("/api/stats")
        cli = json.loads(self.expect_success("stats", "--json"))
        self.assertEqual(stats["counts"], cli["counts"])
        self.assertEqual(set(stats["last_hour"]), set(cli["last_hour"]))
        self.assertEqual(stats["last_day"]["dead"], cli["last_day"]["dead"])

    def test_jobs_pages_newest_first_with_keyset_pagination_search_and_state(self):
        """Pages of ?limit= follow next_before to the end; search finds command text and id prefixes."""
        jobs = [{"command": "echo job %d%s" % (i, " needle" if i % 7 == 0 else "")} for i in range(30)]
        out = self.expect_success("enqueue", "--file", "-", stdin="\n".join(map(json.dumps, jobs)).encode())
        ids = out.split()
        self.expect_success("cancel", ids[3], ids[4], err=None)
        dash = self.dashboard()
        seen, before = [], ""
        while True:
            page = dash.get_json("/api/jobs?limit=7" + before)
            seen += [j["id"] for j in page["jobs"]]
            if page["next_before"] is None:
                break
            before = "&before=%d" % page["next_before"]
        self.assertEqual(seen, list(reversed(ids)))
        found = [j["id"] for j in dash.get_json("/api/jobs?q=needle")["jobs"]]
        self.assertEqual(found, [ids[i] for i in (28, 21, 14, 7, 0)])
        self.assertEqual([j["id"] for j in dash.get_json("/api/jobs?q=" + ids[5])["jobs"]], [ids[5]])
        self.assertEqual([j["id"] for j in dash.get_json("/api/jobs?state=dead")["jobs"]], [ids[4], ids[3]])
        html = dash.get("/jobs?state=dead")
        self.assertIn(ids[3], html)
        self.assertNotIn(ids[5], html)
        self.assertEqual(dash.request("/api/jobs?state=nope")[0], 400)

    def test_stats_follow_runs_that_finish_close_together(self):
        """The cached last hour/day catches up with a run that finished while its recompute had to
        wait (it is recomputed at most once a second), and the page's stats mark moves with it."""
        dash = self.dashboard()
        with _HTTP.open(urllib.request.Request(dash.base + "/events", headers={"Cookie": dash.cookie}),
                        timeout=DEADLINE) as stream:
            first = TestDashboardServer.next_event(stream)
            for n in (1, 2, 3):
                self.add("true")
                self.run_once()
                self.wait_until(lambda: dash.get_json("/api/stats")["last_hour"]["completed"] == n,
                                timeout=5.0, message="stats to count %d runs" % n)
            self.wait_until(lambda: TestDashboardServer.next_event(stream)["stats"] != first["stats"],
                            timeout=5.0, message="a new stats mark")

    def test_metrics_parse_as_prometheus_text_and_match_status(self):
        """Job counts equal status --json; runs_total counts runs and never goes down on purge."""
        self.dead_jobs("exit 3", "exit 4")
        done = self.add("echo ok")
        self.run_once()
        self.add("echo waiting")
        dash = self.dashboard()
        metrics = parse_prometheus(dash.get("/metrics", auth="bearer"))
        counts = json.loads(self.expect_success("status", "--json"))["counts"]
        for state in STATES:
            self.assertEqual(metrics[("queuectl_jobs", frozenset({("state", state)}))], counts[state])
        runs = {o: metrics[("queuectl_runs_total", frozenset({("outcome", o)}))]
                for o in queuectl.RUN_OUTCOMES}
        self.assertEqual(runs["completed"], 1)
        self.assertEqual(runs["failed"], 2)
        self.assertEqual(metrics[("queuectl_run_duration_seconds_count", frozenset())], 3)
        self.assertEqual(metrics[("queuectl_run_duration_seconds_bucket", frozenset({("le", "+Inf")}))], 3)
        self.assertGreater(metrics[("queuectl_queue_latency_seconds", frozenset())], 0)
        self.assertEqual(metrics[("queuectl_workers", frozenset({("state", "alive")}))], 0)
        self.expect_success("purge", "--state", "completed", "--state", "dead", err=None)
        self.assertEqual(self.job_count(), 1)
        self.add("echo more")
        self.run_once()
        metrics = parse_prometheus(dash.get("/metrics", auth="bearer"))
        self.assertEqual(metrics[("queuectl_runs_total", frozenset({("outcome", "completed")}))], 3)
        self.assertEqual(metrics[("queuectl_runs_total", frozenset({("outcome", "failed")}))], 2)
        self.assertEqual(metrics[("queuectl_jobs", frozenset({("state", "completed")}))], 2)
        self.assertNotIn(done, dash.get("/jobs"))

    def test_queues_and_dependencies_as_the_dashboard_shows_them(self):
        """A job's page shows its queue, dependencies, waiting reason and env; retrying a group
        whose dependency is still dead is refused as for one job; a paused queue adds no latency."""
        build = self.add("exit 1", max_retries=0)
        deploy = self.expect_success("enqueue", "-q", "deploys", "--after", build, "--env", "TARGET=<b>prod</b>",
                                     "--", "echo deploy").strip()
        self.run_once()
        self.assertEqual((self.job(build)["state"], self.job(deploy)["outcome"]),
                         ("dead", "dependency %s dead" % build))
        dash = self.dashboard()
        page = dash.get("/jobs/" + deploy)
        self.assertIn("<dd>deploys</dd>", page)
        self.assertIn('<a href="/jobs/%s">%s</a> (dead)' % (build, build), page)
        self.assertIn("<code>TARGET=&lt;b&gt;prod&lt;/b&gt;</code>", page)
        self.assertNotIn("<b>prod</b>", page)
        page = dash.get("/confirm/retry?g=1&outcome=" + urllib.parse.quote("dependency %s dead" % build))
        upto = re.search(r'name="upto" value="(\d+)"', page).group(1)
        status, _, body = dash.post("/actions/retry-matching", {"g": "1", "outcome": "dependency %s dead" % build,
                                                                "upto": upto, "back": "/dlq"})
        self.assertEqual(status, 409, body[:300])
        self.assertIn(b"which is dead: retry that one", body)
        self.assertEqual(self.job(deploy)["state"], "dead")
        # dlq retry of the dependency brings the dependent back, and says so.
        self.expect_success("dlq", "retry", build,
                            err="queuectl: 2 jobs moved back to pending (1 with a job it depends on)\n")
        self.assertEqual(self.job(deploy)["state"], "pending")
        self.expect_success("cancel", build, err=None)          # and its dependent with it
        # Latency: a job waiting in a paused queue is not late.
        self.expect_success("queue", "pause", "held", err=None)
        self.expect_success("enqueue", "-q", "held", "--run-at", "2001-01-01T00:00:00Z", "--", "true")
        latency = parse_prometheus(dash.get("/metrics", auth="bearer"))[("queuectl_queue_latency_seconds",
                                                                          frozenset())]
        self.assertEqual(latency, 0)
        self.expect_success("queue", "resume", "held", err=None)
        latency = parse_prometheus(dash.get("/metrics", auth="bearer"))[("queuectl_queue_latency_seconds",
                                                                          frozenset())]
        self.assertGreater(latency, 3600 * 24 * 365)

    def job_count(self):
        return sum(json.loads(self.expect_success("status", "--json"))["counts"].values())

    def test_actions_go_through_the_store_like_the_cli(self):
        """cancel, retry selected, retry all matching a group (count first), purge, worker stop."""
        dead = self.dead_jobs("exit 3", "exit 3", "exit 3", "exit 4", "exit 4")
        waiting = self.add("echo later", delay="1h")
        dash = self.dashboard()
        page = dash.get("/confirm/retry?g=1&outcome=exit+3&exit=3")
        self.assertIn("<b>3 jobs</b>", page)
        upto = re.search(r'name="upto" value="(\d+)"', page).group(1)
        newer = self.dead_jobs("exit 3")[0]         # dies after the count: not retried by that click
        status, headers, _ = dash.post("/actions/retry-matching",
                                       {"g": "1", "outcome": "exit 3", "exit": "3", "upto": upto, "back": "/dlq"})
        self.assertEqual((status, headers["Location"]), (303, "/dlq?done=retried&n=3"))
        self.assertEqual([self.job(i)["state"] for i in dead], ["pending"] * 3 + ["dead"] * 2)
        self.assertEqual(self.job(newer)["state"], "dead")
        self.assertIn("3 job(s) moved back to pending", dash.get("/dlq?done=retried&n=3"))
        status, _, _ = dash.post("/actions/retry", {"sel": [dead[3], dead[4]], "back": "/dlq"})
        self.assertEqual(status, 303)
        self.assertEqual(self.dlq_ids(), [newer])
        status, _, body = dash.post("/actions/retry", {"one": dead[0], "back": "/dlq"})
        self.assertEqual(status, 409)
        self.assertIn(b"is not in the DLQ", body)
        self.assertEqual(dash.post("/actions/cancel", {"one": waiting, "back": "/jobs"})[0], 303)
        self.assertEqual(self.job(waiting)["state"], "dead")
        status, headers, _ = dash.post("/actions/purge", {"state": "dead", "older_than": "0", "back": "/dlq"})
        self.assertEqual(headers["Location"], "/dlq?done=purged&n=2")
        self.assertEqual(self.dlq_ids(), [])
        status, headers, _ = dash.post("/actions/worker-stop", {"back": "/"})
        self.assertEqual(headers["Location"], "/?done=stopping&n=0")
        self.assertIn("dashboard: 2 job(s) purged", dash.stderr())

    def test_queues_are_shown_filtered_and_paused_like_the_cli(self):
        """Overview lists each queue (counts, running / limit, paused) with pause/resume; /jobs filters by
        queue and shows it; /metrics and /api/jobs have it; a pause from the page is the CLI's pause."""
        self.expect_success("queue", "set", "backups", "--limit", "1", err=None)
        nightly = self.add("echo nightly", queue="backups")
        thumb = self.add("echo thumb", queue="thumbs")
        self.add("echo plain")
        dash = self.dashboard()
        html = dash.get("/")
        section = html[html.index("<h2>Queues</h2>"):]
        section = section[:section.index("</table>")]
        for name in ("backups", "default", "thumbs"):
            self.assertIn('href="/jobs?queue=%s"' % name, section)
        self.assertRegex(section, r'backups</a></td><td><span class="badge s-active">active</span></td>'
                                  r'<td class="num">1</td><td class="num">0 / 1</td>')
        # Pause from the page: the CLI sees it; the button turns into resume.
        status, headers, _ = dash.post("/actions/queue-pause", {"queue": "thumbs", "back": "/"})
        self.assertEqual((status, headers["Location"]), (303, "/?done=paused&n=1"))
        queues = {q["name"]: q for q in json.loads(self.expect_success("queue", "list", "--json"))}
        self.assertTrue(queues["thumbs"]["paused"])
        self.assertFalse(queues["backups"]["paused"])
        html = dash.get("/?done=paused&n=1")
        self.assertIn("1 queue paused", html)
        self.assertRegex(html, r'thumbs</a></td><td><span class="badge s-paused">paused</span>')
        self.assertIn('action="/actions/queue-resume"', html)
        self.assertEqual(dash.post("/actions/queue-resume", {"queue": "thumbs", "back": "/"})[0], 303)
        self.assertFalse({q["name"]: q for q in json.loads(self.expect_success("queue", "list", "--json"))}
                         ["thumbs"]["paused"])
        # An unknown queue changes nothing.
        before = self.db_dump()
        status, _, body = dash.post("/actions/queue-pause", {"queue": "nosuch", "back": "/"})
        self.assertEqual(status, 409)
        self.assertIn(b"no queue", body)
        self.assertEqual(self.db_dump(), before)
        # The jobs list: a queue column, and a filter.
        html = dash.get("/jobs?queue=backups")
        self.assertIn(nightly, html)
        self.assertNotIn(thumb, html)
        self.assertIn('<option value="backups" selected>backups</option>', html)
        self.assertIn("<th>Queue</th>", dash.get("/jobs"))
        self.assertEqual(dash.request("/jobs?queue=no%20way")[0], 400)
        api = dash.get_json("/api/jobs?queue=thumbs")
        self.assertEqual([j["id"] for j in api["jobs"]], [thumb])
        metrics = parse_prometheus(dash.get("/metrics"))
        self.assertEqual(metrics[("queuectl_queue_jobs", frozenset({("queue", "backups"), ("state", "pending")}))], 1)
        self.assertEqual(metrics[("queuectl_queue_paused", frozenset({("queue", "thumbs")}))], 0)

    def test_read_only_offers_and_accepts_no_action(self):
        """--read-only: no forms or action links on any page; every POST is 403 and changes nothing."""
        [job_id] = self.dead_jobs("exit 3")
        self.add("echo waiting")
        dash = self.dashboard("--read-only")
        for path in ("/", "/jobs", "/dlq", "/jobs/" + job_id):
            html = dash.get(path)
            self.assertNotIn("<form method=\"post\"", html)
            self.assertNotIn("/confirm/", html)
            self.assertNotIn("<button", html.replace("<button>Filter</button>", ""))
        self.assertEqual(dash.request("/confirm/retry")[0], 403)
        before = self.db_dump()
        self.assertEqual(dash.post("/actions/retry", {"one": job_id})[0], 403)
        self.assertEqual(dash.post("/actions/purge", {"state": "dead"})[0], 403)
        self.assertEqual(self.db_dump(), before)

    def test_token_file_keeps_the_token_across_restarts_with_mode_0600(self):
        """--token-file is created 0600 and reused; a file others can read is refused in one line."""
        path = os.path.join(self.tmp, "token")
        first = self.dashboard("--token-file", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(first.stop(), 0)
        second = self.dashboard("--token-file", path)
        self.assertEqual(second.token, first.token)
        with open(path) as f:
            self.assertEqual(f.read(), first.token + "\n")
        os.chmod(path, 0o644)
        code, out, err = self.script("dashboard", "--port", "0", "--token-file", path)
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err.decode(), "queuectl: error: token file %s is readable by other users; "
                                       "run: chmod 600 %s\n" % (path, path))

    def test_user_errors_are_one_line(self):
        """A port in use or a bad --port: one line on stderr, no traceback, non-zero exit."""
        dash = self.dashboard()
        code, out, err = self.script("dashboard", "--port", dash.port)
        self.assertEqual((code, out), (1, b""))
        self.assertRegex(err.decode(), r"^queuectl: error: cannot listen on 127\.0\.0\.1 port \d+: .*\n$")
        self.expect_failure("dashboard", "--port", "70000", code=2)
        self.expect_failure("dashboard", "--allow-host", "http://x", code=2)

    def test_sigterm_and_ctrl_c_exit_0(self):
        """The dashboard runs in the foreground until SIGTERM or SIGINT, then exits 0 quietly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            dash = self.dashboard()
            dash.get("/")
            self.assertEqual(dash.stop(sig), 0, dash.stderr())
            self.assertNotIn("Traceback", dash.stderr())

    def test_oversized_requests_are_refused(self):
        """A body over 64 KiB (413, unread), a 10 kB URL (414), an unknown method (405)."""
        dash = self.dashboard()
        import socket
        with socket.create_connection(("127.0.0.1", dash.port), timeout=DEADLINE) as s:
            s.sendall(("POST /actions/purge HTTP/1.1\r\nHost: %s\r\nOrigin: %s\r\nCookie: %s\r\n"
                       "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000000\r\n\r\n"
                       % (dash.host, dash.base, dash.cookie)).encode())
            self.assertTrue(s.recv(100).startswith(b"HTTP/1.0 413"))
        self.assertEqual(dash.request("/jobs?q=" + "x" * 10000)[0], 414)
        self.assertEqual(dash.request("/", method="PUT")[0], 405)

    def test_stalled_clients_neither_block_others_nor_stay_connected(self):
        """Slow-loris: half-sent requests do not hold up other requests and are dropped at the
        socket timeout (20 s; 4 s here, set before the server starts, to keep the suite short)."""
        timeout = 4.0
        dash = self.dashboard(python_flags=["-c", "import sys; sys.argv.pop(0); sys.path.insert(0, %r); "
                                            "import queuectl; queuectl.DASHBOARD_SOCKET_TIMEOUT = %r; "
                                            "queuectl.main_and_exit()" % (os.path.dirname(QUEUECTL), timeout)])
        import socket
        stalled = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", dash.port), timeout=DEADLINE + 20)
            s.sendall(b"GET / HTTP/1.1\r\nHost: " + dash.host.encode() + b"\r\n")
            stalled.append(s)
            self.addCleanup(s.close)
        t0 = time.monotonic()
        self.assertEqual(dash.get("/healthz", auth=None), "ok\n")
        self.assertLess(time.monotonic() - t0, 2.0)
        for s in stalled:
            self.assertEqual(s.recv(100), b"")      # closed by the server, not by us
        waited = time.monotonic() - t0
        self.assertGreater(waited, timeout - 1)
        self.assertLess(waited, timeout + 10)

    def test_live_events_push_a_change_mark(self):
        """/events sends the current marks at once and new ones within 2 s of a CLI enqueue."""
        dash = self.dashboard()
        req = urllib.request.Request(dash.base + "/events", headers={"Cookie": dash.cookie})
        with _HTTP.open(req, timeout=DEADLINE) as stream:
            self.assertEqual(stream.headers["Content-Type"], "text/event-stream")
            first = self.next_event(stream)
            self.add("echo new")
            t0 = time.monotonic()
            second = self.next_event(stream)
            self.assertLess(time.monotonic() - t0, 2.0)
        self.assertNotEqual(first["jobs"], second["jobs"])
        self.assertEqual(first["runs"], second["runs"])

    @staticmethod
    def next_event(stream):
        while True:
            line = stream.readline()
            if not line:
                raise AssertionError("the event stream ended")
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    @sqlite_only
    def test_no_read_transaction_is_held_between_requests(self):
        """With a page's event stream open and pages served, a checkpoint can still reset the WAL."""
        self.dead_jobs("exit 3")
        dash = self.dashboard()
        req = urllib.request.Request(dash.base + "/events", headers={"Cookie": dash.cookie})
        with _HTTP.open(req, timeout=DEADLINE) as stream:
            self.next_event(stream)
            for path in ("/", "/jobs", "/dlq", "/metrics", "/api/stats"):
                dash.get(path)
            for i in range(20):
                self.add("echo %d" % i)
            self.next_event(stream)
            conn = self.connect(readonly=False)
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
            self.assertEqual(busy, 0)
            self.assertEqual(os.path.getsize(self.db + "-wal"), 0)
            self.assertEqual(dash.get_json("/api/status")["counts"]["pending"], 20)


def _browser_binaries():
    """(chromedriver, chromium) paths, or None when either is missing."""
    driver = shutil.which("chromedriver")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return (driver, browser) if driver and browser else None


class WebDriver:
    """A chromedriver process and one headless Chromium session, spoken to in W3C
    WebDriver JSON over urllib (no Python package needed)."""

    def __init__(self, driver, browser, tmp):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(os.path.join(tmp, "chromedriver.log"), "wb")
        self.proc = subprocess.Popen([driver, "--port=%d" % port], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.base = "http://127.0.0.1:%d" % port
        self.session = None
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.quit()
                raise AssertionError("chromedriver did not start")
            time.sleep(0.05)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--user-data-dir=" + os.path.join(tmp, "chromium-profile")]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": browser, "args": args},
                "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method, path, body=None, timeout=DEADLINE):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _HTTP.open(req, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError("webdriver %s %s: %s" % (method, path, e.read()[:1000]))

    def call(self, method, path, body=None):
        return self._call(method, "/session/%s%s" % (self.session, path), body)

    def go(self, url):
        self.call("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))      # {"element-6066-...": id}

    def click(self, css):
        self.call("POST", "/element/%s/click" % self.find(css), {})

    def screenshot(self, path):
        import base64
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", "/screenshot")))

    def logs(self, kind):
        """Chromium's 'browser' (console) or 'performance' (DevTools) log since the last call."""
        return self.call("POST", "/se/log", {"type": kind})

    def cdp(self, cmd, params):
        return self.call("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    def quit(self):
        if self.session is not None:
            try:
                self._call("DELETE", "/session/%s" % self.session, timeout=10)
            except (AssertionError, OSError):
                pass
        if self.proc.poll() is None:
            kill_session(self.proc.pid)
        self.proc.wait(10)
        self.log.close()


#: Records what the page does that it must not: CSP violations and markup from job data run.
_WATCH_PAGE = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});
window.__xss = [];
"""
_EVIL = "<img src=x onerror=window.__xss.push(1)><script>window.__xss.push(2)</script>"


class TestDashboardBrowser(DashboardTestCase):
    """The dashboard in headless Chromium: what an operator sees and clicks, and what the page must never do."""

    @classmethod
    def setUpClass(cls):
        found = _browser_binaries()
        if found is None:
            message = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
            if os.environ.get("CI") == "true":
                raise AssertionError("CI=true: browser tests must run, but " + message)
            sys.stderr.write("\nskipping the dashboard browser tests: %s\n" % message)
            raise unittest.SkipTest(message)
        cls.browser_tmp = tempfile.TemporaryDirectory(prefix="queuectl-browser-")
        cls.driver = WebDriver(found[0], found[1], cls.browser_tmp.name)
        cls.driver.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": _WATCH_PAGE})

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        cls.browser_tmp.cleanup()

    def setUp(self):
        super().setUp()
        self.driver.logs("browser")
        self.driver.logs("performance")

    def open(self, dash, path="/"):
        """Load a page the way a user does: the printed URL first (token -> cookie), then `path`."""
        if not getattr(self, "_closes_page", False):
            # Leave the page before the dashboard stops (cleanups run last first): its
            # event stream would retry and log errors into the next test.
            self.addCleanup(self.driver.go, "about:blank")
            self._closes_page = True
        self.driver.go(dash.line)
        if path != "/":
            self.driver.go(dash.base + path)
        self.wait_until(lambda: self.driver.js("return document.readyState") == "complete", message="page load")

    def shot(self, name):
        """Save a screenshot in the test's directory (and in $QUEUECTL_SCREENSHOTS, if set)."""
        path = os.path.join(self.tmp, name + ".png")
        self.driver.screenshot(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        if os.environ.get("QUEUECTL_SCREENSHOTS"):
            shutil.copy(path, os.path.join(os.environ["QUEUECTL_SCREENSHOTS"], name + ".png"))
        return path

    def assert_page_behaved(self, dash):
        """No CSP violation, no console error, no request to another origin, nothing from job data ran."""
        self.assertEqual(self.driver.js("return window.__csp"), [])
        self.assertEqual(self.driver.js("return window.__xss"), [])
        errors = [e["message"] for e in self.driver.logs("browser") if e["level"] == "SEVERE"]
        self.assertEqual(errors, [])
        urls = []
        for entry in self.driver.logs("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        self.assertTrue(urls, "the performance log recorded no request")
        self.assertEqual([u for u in urls if not u.startswith(dash.base + "/")], [])

    def test_overview_counts_equal_status_json(self):
        """The overview's tiles show the counts `status --json` prints; a screenshot is saved."""
        self.add("echo fine")
        self.dead_jobs("exit 3")
        self.add("echo waiting")
        self.add("echo later", delay="1h")
        dash = self.dashboard()
        self.open(dash)
        shown = self.driver.js("""
            var out = {};
            document.querySelectorAll('a.tile').forEach(function (t) {
              out[t.querySelector('span').textContent] = parseInt(t.querySelector('b').textContent, 10);
            });
            return out;""")
        self.assertEqual(shown, json.loads(self.expect_success("status", "--json"))["counts"])
        self.shot("overview")
        self.assert_page_behaved(dash)

    def test_screenshot_of_a_busy_queue(self):
        """A day of history (made through the Store with injected times) and a live pool: the overview
        shows it all, with no error; the screenshot is the README's (QUEUECTL_SCREENSHOTS=docs)."""
        rng = random.Random(8)
        now = time.time()
        self.init_db()
        with self.open_store() as store:
            wid = "%s:%d:1" % (queuectl.this_host(), os.getpid())
            for i, t in enumerate(sorted(now - 86400 * rng.random() ** 2.5 for _ in range(400))):
                store.enqueue([{"command": "backup-db --shard %d" % (i % 12), "cwd": self.tmp,
                                "max_retries": 0}], now=t)
                started = t + rng.random() * 3
                job = store.claim(wid, now=started)
                code = 0 if rng.random() > 0.06 else rng.choice((1, 2, 75))
                result = queuectl.RunResult(code, "exit %d" % code, b"done\n")
                store.finish(job["id"], job["run"], wid, result, now=started + rng.lognormvariate(0.3, 0.9))
        for i in range(3):
            self.add("sleep 30 # report %d" % i, priority=1)
        for i in range(25):
            self.add("resize-images --batch %d" % i, queue="thumbs")
        self.expect_success("queue", "set", "thumbs", "--limit", "2", err=None)
        pool = self.start_pool("--count", "3")
        self.wait_until(lambda: sum(w["job"] is not None for w in json.loads(
            self.expect_success("status", "--json"))["workers"]) == 3, message="3 busy workers")
        dash = self.dashboard()
        self.open(dash)
        rows = self.driver.js("""return Array.from(document.querySelectorAll('section.region'), function (r) {
            return [r.getAttribute('data-region'), r.querySelectorAll('tbody tr').length]; });""")
        self.assertEqual(rows, [["counts", 0], ["queues", 2], ["workers", 3], ["stats", 8], ["dead", 8]])
        self.shot("dashboard")
        self.assert_page_behaved(dash)
        self.stop_pool(pool)

    def test_a_job_enqueued_from_the_cli_appears_within_2s_without_reload(self):
        """Live updates: the jobs list and the counts change in place (the page is never reloaded)."""
        self.add("echo first")
        dash = self.dashboard()
        self.open(dash, "/jobs")
        self.wait_until(lambda: self.driver.js("return document.getElementById('live').textContent") == "live",
                        message="the live indicator")
        self.driver.js("window.__sameDocument = true;")
        job_id = self.add("echo appears-live")
        t0 = time.monotonic()
        self.wait_until(lambda: job_id in self.driver.js("return document.querySelector('main').textContent"),
                        timeout=2.0, message="job %s on the page" % job_id, interval=0.05)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertTrue(self.driver.js("return window.__sameDocument === true"), "the page was reloaded")
        self.shot("jobs")
        self.assert_page_behaved(dash)

    def test_a_hidden_tab_stops_listening_and_catches_up_when_shown(self):
        """visibilitychange to hidden closes the event stream (no updates); shown again, it reconnects
        and fetches what changed meanwhile."""
        dash = self.dashboard()
        self.open(dash, "/jobs")
        live = "return document.getElementById('live').textContent"
        self.wait_until(lambda: self.driver.js(live) == "live", message="the live indicator")
        self.driver.js("""Object.defineProperty(document, 'hidden', {value: true, configurable: true});
                          document.dispatchEvent(new Event('visibilitychange'));""")
        self.assertEqual(self.driver.js(live), "paused")
        job_id = self.add("echo while-hidden")
        time.sleep(1.5)
        self.assertNotIn(job_id, self.driver.js("return document.querySelector('main').textContent"))
        self.driver.js("""Object.defineProperty(document, 'hidden', {value: false, configurable: true});
                          document.dispatchEvent(new Event('visibilitychange'));""")
        self.wait_until(lambda: job_id in self.driver.js("return document.querySelector('main').textContent"),
                        timeout=3.0, message="the page to catch up", interval=0.05)
        self.assert_page_behaved(dash)

    def test_clicking_retry_on_a_dlq_row_moves_it_to_pending(self):
        """DLQ page: the row's retry button posts the action; the job is pending and the page says so."""
        ids = self.dead_jobs("exit 3", "exit 4")
        dash = self.dashboard()
        self.open(dash, "/dlq")
        self.shot("dlq")
        self.driver.click('button[name=one][value="%s"]' % ids[0])
        self.wait_until(lambda: self.job(ids[0])["state"] == "pending", message="the retried job to be pending")
        self.assertEqual(self.job(ids[1])["state"], "dead")
        self.wait_until(lambda: "1 job(s) moved back to pending" in self.driver.js(
            "return document.body.textContent"), message="the confirmation on the page")
        self.assert_page_behaved(dash)

    def test_markup_in_job_data_adds_no_element_and_runs_nothing(self):
        """A command and output full of <img onerror> and <script> show as text on every page."""
        [job_id] = self.dead_jobs("echo '%s'; echo '%s' >&2; exit 3" % (_EVIL, _EVIL))
        dash = self.dashboard()
        for path in ("/", "/jobs", "/dlq", "/jobs/" + job_id, "/jobs?q=script"):
            self.open(dash, path)
            counts = self.driver.js("""return [document.querySelectorAll('img').length,
                                               document.querySelectorAll('script').length,
                                               document.querySelectorAll('[onerror]').length];""")
            self.assertEqual(counts, [0, 1, 0], path)
            if path != "/":
                self.assertIn(_EVIL, self.driver.js("return document.querySelector('main').textContent"), path)
            if path.startswith("/jobs/"):
                self.shot("job")
            self.assert_page_behaved(dash)


###############################################################################
# Performance and development: bench.py, help, the README #####################
###############################################################################

class TestBenchScript(unittest.TestCase):
    """bench.py still runs (one small section; timings are not asserted)."""

    def test_bench_quick_scale_section_runs(self):
        """bench.py is not run by the suite (timings are not asserted), but
        one small section keeps it from rotting as queuectl changes."""
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "bench.json")
            proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--only", "scale",
                                   "--json", out], capture_output=True, text=True, timeout=300)
            self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
            with open(out) as f:
                self.assertIsInstance(json.load(f), dict)


class TestMeta(QueueTestCase):
    """Every command has help and a README section, and README's pipelines work."""

    def test_every_command_has_help(self):
        paths = command_paths()
        for command in CONTRACT_COMMANDS:
            self.assertIn(list(command), paths, "command missing: %s" % " ".join(command))
        for path in [[]] + paths:
            for flag in ("--help", "-h"):
                with self.subTest(command=" ".join(path), flag=flag):
                    out = self.expect_success(*(path + [flag]), db=False)
                    self.assertTrue(out.startswith("usage: " + " ".join(["queuectl"] + path)), out[:200])
        top = self.expect_success("--help", db=False)
        self.assertIn("QUEUECTL_DB", top)
        for path in paths:
            if len(path) == 1:
                self.assertIn(path[0], top)

    def readme_pipelines(self):
        """The shell lines of README.md that pipe queuectl's output into something."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            blocks = re.findall(r"```sh\n(.*?)```", f.read(), re.S)
        return [line for block in blocks for line in block.splitlines()
                if line.startswith("queuectl ") and " | " in line]

    def test_readme_pipelines_work_on_empty_and_large_queues(self):
        pipelines = self.readme_pipelines()
        self.assertTrue(pipelines)
        if not shutil.which("jq"):
            skip_or_fail(self, "jq is not installed (README's pipelines use it)")
        bindir = os.path.join(self.tmp, "bin")
        os.mkdir(bindir)
        with open(os.path.join(bindir, "queuectl"), "w") as f:
            f.write("#!/bin/sh\nexec %s %s \"$@\"\n" % (shlex.quote(sys.executable), shlex.quote(QUEUECTL)))
        os.chmod(os.path.join(bindir, "queuectl"), 0o755)
        env = self.env(QUEUECTL_DB=self.db, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))

        def run(line):
            r = subprocess.run(["bash", "-o", "pipefail", "-c", line], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=self.tmp, timeout=DEADLINE)
            self.assertEqual(r.returncode, 0, "%s\n%s" % (line, r.stderr.decode(errors="replace")))
            self.assertNotIn(b"Traceback", r.stderr)

        self.init_db()
        for line in pipelines:
            run(line)       # an empty queue
        # 150 jobs that died of a timeout (more than list's default 100), one of exit 3.
        with self.open_store() as store:
            worker = queuectl.this_host() + ":1:1"
            store.register_worker(worker)
            store.enqueue([{"command": "true", "cwd": self.tmp, "max_retries": 0} for _ in range(151)])
            for n in range(151):
                job = store.claim(worker)
                store.finish(job["id"], job["run"], worker,
                             queuectl.RunResult(3, "exit 3") if n == 0 else queuectl.RunResult(None, "timeout"))
        for line in pipelines:
            run(line)
        self.assertEqual(json.loads(self.expect_success("status", "--json"))["counts"],
                         {"pending": 150, "processing": 0, "completed": 0, "failed": 0, "dead": 1})

    def test_gitignore_covers_build_output(self):
        """`pip install .` and `python -m build` leave build/ and *.egg-info/ behind."""
        with open(os.path.join(HERE, ".gitignore")) as f:
            lines = f.read().split()
        self.assertIn("build/", lines)
        self.assertIn("*.egg-info/", lines)

    def test_pyproject_is_valid_for_pip(self):
        """pyproject.toml parses, its [project] table holds the metadata and the extras are
        lists of requirements (a key under the wrong table broke `pip install .`)."""
        try:
            import tomllib
        except ImportError:
            self.skipTest("tomllib is Python 3.11+")
        with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        self.assertEqual(project["dynamic"], ["version"])
        self.assertIn("Environment :: Console", project["classifiers"])
        self.assertEqual(project["scripts"], {"queuectl": "queuectl:main_and_exit"})
        self.assertTrue(callable(queuectl.main_and_exit))
        for extra, requirements in project["optional-dependencies"].items():
            self.assertEqual(extra, "postgres")
            self.assertTrue(requirements and all(re.match(r"^[A-Za-z0-9_.\[\]-]+(>=[0-9.]+)?$", r)
                                                 for r in requirements), requirements)

    def test_every_command_is_in_the_readme(self):
        readme = os.path.join(HERE, "README.md")
        if not os.path.exists(readme):
            self.skipTest("README.md does not exist yet (it is being written separately)")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        missing = [" ".join(p) for p in command_paths() if " ".join(p) not in text]
        self.assertEqual(missing, [], "commands missing from README.md")
        self.assertIn("QUEUECTL_DB", text)


###############################################################################
# PostgreSQL (issue 7) #######################################################
###############################################################################

#: A PostgreSQL server for TestPostgres, e.g. postgresql://postgres@127.0.0.1:5432/postgres.
PG_DSN_ENV = "QUEUECTL_TEST_PG_DSN"
_pg_skip_told = []


def _pg_driver():
    """psycopg (3) or psycopg2, whichever is importable, else None."""
    try:
        import psycopg
        return psycopg
    except ImportError:
        try:
            import psycopg2
            return psycopg2
        except ImportError:
            return None


def read_file(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class TestPostgres(unittest.TestCase):
    """The queue on a real PostgreSQL server, through the real CLI and real
    workers. Each test has a schema of its own (options=-csearch_path=...),
    dropped at the end."""

    def setUp(self):
        dsn = os.environ.get(PG_DSN_ENV)
        if not dsn:
            if not _pg_skip_told:
                _pg_skip_told.append(True)
                sys.stderr.write("\n*** PostgreSQL tests SKIPPED: set %s=postgresql://postgres@127.0.0.1:5432/"
                                 "postgres (and run with a Python that has psycopg) to run them ***\n" % PG_DSN_ENV)
            # A plain skip even under CI: the SQLite runs have no server; .ci/run's
            # PostgreSQL run sets the variable and fails on any skip of this half.
            self.skipTest("%s is not set: the PostgreSQL half did not run" % PG_DSN_ENV)
        self.driver = _pg_driver()
        if self.driver is None:
            skip_or_fail(self, "%s is set but neither psycopg nor psycopg2 is importable by %s"
                         % (PG_DSN_ENV, sys.executable))
        self.dsn = dsn
        self.schema = "qct_%d_%06d" % (os.getpid(), random.randrange(10 ** 6))
        self.url = self.with_schema(self.schema)
        self.admin = self.connect(dsn)
        self.addCleanup(self.admin.close)
        self.addCleanup(self.sql, 'DROP SCHEMA IF EXISTS "%s" CASCADE' % self.schema)
        self.tmp = tempfile.mkdtemp(prefix="qc-pg-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pools = []
        self.addCleanup(self.kill_pools)

    # -- helpers ------------------------------------------------------------------

    def with_schema(self, schema, dsn=None):
        dsn = dsn or self.dsn
        return dsn + ("&" if "?" in dsn else "?") + "options=-csearch_path%3D" + schema

    def connect(self, dsn):
        conn = self.driver.connect(dsn)
        conn.autocommit = True
        return conn

    def sql(self, text, params=None, conn=None):
        cur = (conn or self.admin).cursor()
        cur.execute(text, params)
        return cur.fetchall() if cur.description else None

    def q(self, text, params=None):
        """A query in this test's schema."""
        self.sql('SET search_path = "%s"' % self.schema)
        try:
            return self.sql(text, params)
        finally:
            self.sql("RESET search_path")

    def env(self, db=None, extra=None):
        env = dict(os.environ)
        env.pop("QUEUECTL_BUSY_TIMEOUT", None)
        env["QUEUECTL_DB"] = db or self.url
        env.update(extra or {})
        return env

    def cli(self, *args, db=None, env=None, python=None, timeout=60):
        r = subprocess.run([python or sys.executable, QUEUECTL] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=self.env(db, env), cwd=self.tmp, timeout=timeout)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    def ok(self, *args, **kw):
        code, out, err = self.cli(*args, **kw)
        self.assertEqual(code, 0, "queuectl %s: exit %d: %s" % (" ".join(args), code, err))
        return out

    def enqueue(self, job, *flags):
        return self.ok("enqueue", json.dumps(job) if isinstance(job, dict) else job, *flags).strip()

    def pool(self, *args, db=None, env=None):
        log = open(os.path.join(self.tmp, "pool-%d.log" % len(self.pools)), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, QUEUECTL, "worker", "start"] + list(args), stdout=log,
                                stderr=subprocess.STDOUT, env=self.env(db, env), cwd=self.tmp,
                                start_new_session=True)
        self.pools.append(proc)
        return proc

    def kill_pools(self):
        for proc in self.pools:
            kill_session(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Jobs have sessions of their own: found by the URL in their environment.
        mark = b"QUEUECTL_DB=" + self.url.encode() + b"\0"
        kill_all([p for p in pids() if mark in read_proc(p, "environ")])

    def pool_log(self, i=0):
        with open(os.path.join(self.tmp, "pool-%d.log" % i), "rb") as f:
            return f.read().decode(errors="replace")

    def until(self, predicate, what, timeout=DEADLINE):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
            time.sleep(0.05)

    def job(self, job_id):
        return json.loads(self.ok("show", job_id, "--json"))

    def states(self):
        return dict(self.q("SELECT id, state FROM jobs"))

    def assert_one_line_error(self, code, out, err, *needles):
        self.assertEqual(code, 1, err)
        self.assertEqual(out, "")
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("queuectl: error: "), err)
        self.assertNotIn("Traceback", err)
        for needle in needles:
            self.assertIn(needle, err)

    # -- the contract, as on SQLite ----------------------------------------------------

    def test_lifecycle_order_retry_backoff_dlq(self):
        """Priorities first, FIFO within one priority, a delayed job after its
        time; a failing job retried with backoff, then dead; dlq retry."""
        ledger = os.path.join(self.tmp, "ledger")
        self.ok("config", "set", "backoff_base", "1")
        ids = {}
        for name, prio in (("a", 0), ("b", 5), ("c", 0), ("d", 5)):
            ids[name] = self.enqueue({"command": "echo %s >> %s" % (name, ledger), "priority": prio})
        ids["late"] = self.enqueue({"command": "echo late >> %s" % ledger, "priority": 9, "delay": 8})
        ids["bad"] = self.enqueue({"command": "echo bad >> %s; exit 3" % ledger, "max_retries": 1})
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(status["counts"]["pending"], 6, status)
        self.ok("worker", "start", "--once")
        with open(ledger) as f:
            self.assertEqual(f.read().split(), ["b", "d", "a", "c", "bad"])
        self.assertEqual(self.job(ids["bad"])["state"], "failed")
        self.assertEqual(self.job(ids["late"])["state"], "pending")
        self.pool("--count", "2")
        code, _, err = self.cli("wait", ids["late"], ids["bad"], timeout=DEADLINE)
        self.assertEqual(code, 3, err)      # `wait` returns the dead job's exit code
        with open(ledger) as f:
            self.assertEqual(sorted(f.read().split()[5:]), ["bad", "late"])
        bad = self.job(ids["bad"])
        self.assertEqual((bad["state"], bad["attempts"], bad["exit_code"]), ("dead", 2, 3))
        self.assertIn(ids["bad"], self.ok("dlq", "list"))
        self.ok("dlq", "retry", ids["bad"])
        self.assertIn(self.job(ids["bad"])["state"], ("pending", "processing", "failed", "dead"))
        self.until(lambda: self.job(ids["bad"])["state"] == "dead" and self.job(ids["bad"])["attempts"] == 2,
                   "the retried job to die again")
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual({s: status["counts"][s] for s in ("completed", "dead", "pending")},
                         {"completed": 5, "dead": 1, "pending": 0}, status)

    def test_cancel_wait_purge_stats_stop(self):
        long = self.enqueue({"command": "sleep 30"})
        waiting = self.enqueue({"command": "true", "delay": 3600})
        self.ok("cancel", waiting)
        job = self.job(waiting)
        self.assertEqual((job["state"], job["outcome"]), ("dead", "cancelled"))
        pool = self.pool("--count", "1")
        self.until(lambda: self.job(long)["state"] == "processing", "the long job to start")
        self.ok("cancel", long)
        code, _, err = self.cli("wait", long, timeout=DEADLINE)
        self.assertEqual(code, 1, err)
        self.assertIn("cancelled", err)
        done = self.enqueue({"command": "true"})
        self.ok("wait", done, timeout=DEADLINE)
        stats = json.loads(self.ok("stats", "--json"))
        self.assertEqual(stats["last_hour"]["completed"], 1, stats)
        self.assertEqual(stats["counts"]["dead"], 2, stats)
        code, out, err = self.cli("purge", "--older-than", "0", "--state", "completed", "--state", "dead")
        self.assertEqual(code, 0, err)
        self.assertIn("1 completed job", err)
        self.assertIn("2 dead jobs", err)
        self.assertEqual(self.q("SELECT COUNT(*) FROM jobs")[0][0], 0)
        self.assertEqual(json.loads(self.ok("status", "--json"))["counts"],
                         {s: 0 for s in STATES})
        code, _, err = self.cli("worker", "stop", "--timeout", "20", timeout=DEADLINE)
        self.assertEqual(code, 0, err)
        self.assertEqual(pool.wait(timeout=DEADLINE), 0, self.pool_log())

    def test_idle_worker_picks_up_at_once(self):
        """An idle worker is woken by NOTIFY: pickup in milliseconds, not at the next poll."""
        self.ok("init")
        self.pool("--count", "1")
        self.until(lambda: self.q("SELECT COUNT(*) FROM workers")[0][0] == 1, "the worker to register")
        time.sleep(1.0)     # let it settle into its idle wait
        delays = []
        for i in range(5):
            stamp = os.path.join(self.tmp, "t%d" % i)
            job = self.enqueue({"command": "date +%%s.%%N > %s" % stamp})
            enqueued = time.time()
            self.ok("wait", job, timeout=DEADLINE)
            with open(stamp) as f:
                delays.append(float(f.read()) - enqueued)
        delays.sort()
        self.assertLess(delays[2], 0.25, delays)

    def test_polling_without_listen(self):
        """QUEUECTL_PG_LISTEN=0 (PgBouncer in transaction mode): workers poll, and still pick jobs up."""
        self.pool("--count", "1", env={"QUEUECTL_PG_LISTEN": "0"})
        job = self.enqueue({"command": "true"})
        self.ok("wait", job, timeout=DEADLINE)

    def test_queue_limit_holds_across_two_pools(self):
        """max_running 1 on a queue: two pools of three workers never run two of its jobs at once."""
        ledger = os.path.join(self.tmp, "ledger")
        self.ok("queue", "set", "one", "--limit", "1")
        ids = [self.enqueue({"command": "echo start $(date +%%s.%%N) >> %s; sleep 0.2; echo end $(date +%%s.%%N) >> %s"
                                        % (ledger, ledger), "queue": "one"}) for _ in range(8)]
        self.pool("--count", "3")
        self.pool("--count", "3")
        self.ok("wait", *ids, timeout=60)
        with open(ledger) as f:
            events = [line.split() for line in f]
        events.sort(key=lambda e: float(e[1]))
        running = 0
        for kind, _ in events:
            running += 1 if kind == "start" else -1
            self.assertLessEqual(running, 1, events)
        self.assertEqual(len(events), 16)

    def test_lost_connection_is_ridden_out(self):
        """The server drops every worker connection, idle and busy: workers
        reconnect and every job completes once."""
        ledger = os.path.join(self.tmp, "ledger")
        self.ok("init")
        self.pool("--count", "2")
        self.until(lambda: self.q("SELECT COUNT(*) FROM workers")[0][0] == 2, "the workers to register")
        ids = [self.enqueue({"command": "sleep 0.3; echo %d >> %s" % (i, ledger)}) for i in range(6)]
        time.sleep(0.5)
        self.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE application_name = 'queuectl' AND pid <> pg_backend_pid() AND datname = current_database()")
        self.ok("wait", *ids, timeout=60)
        with open(ledger) as f:
            runs = f.read().split()
        self.assertEqual(sorted(set(runs)), [str(i) for i in range(6)])
        self.assertIn("lost the connection", self.pool_log())

    def test_counts_and_claim_order_in_the_store(self):
        """The store API directly: counts folded from deltas stay right;
        a result and the next claim are one transaction."""
        store = queuectl.open_store(self.url)
        self.addCleanup(store.close)
        now = store.now()
        store.enqueue([{"command": "true", "cwd": self.tmp, "priority": p} for p in (1, 3, 2)], now=now)
        job = store.claim("h:1:1", now=now)
        self.assertEqual(job["priority"], 3)
        settled, nxt = store.finish(job["id"], job["run"], "h:1:1", queuectl.RunResult(0, "exit 0"),
                                    claim_next=True)
        self.assertEqual((settled[0], nxt["priority"]), ("completed", 2))
        self.assertEqual(store.counts(), {"pending": 1, "processing": 1, "completed": 1, "failed": 0, "dead": 0})
        self.assertGreater(self.q("SELECT COUNT(*) FROM count_deltas")[0][0], 0)
        store.fold_counts()
        self.assertEqual(self.q("SELECT COUNT(*) FROM count_deltas")[0][0], 0)
        self.assertEqual(store.counts(), {"pending": 1, "processing": 1, "completed": 1, "failed": 0, "dead": 0})

    def test_schema_4_is_upgraded_and_counts_stay_right(self):
        """A version-4 schema (the count trigger on every change of state) is
        upgraded by the first process that opens it; then a worker's results
        and claims write their own count deltas and the trigger counts the
        rest (a cancel, a dead job's dependents): every count matches the jobs."""
        ids = [self.enqueue({"command": c, "max_retries": 0}) for c in ("true", "true", "false", "true")]
        self.enqueue({"command": "true", "after": [ids[2]]})
        self.q("""
            DROP TRIGGER jobs_count_update ON jobs;
            ALTER TABLE jobs DROP COLUMN self_counted;
            CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
                FOR EACH ROW WHEN (OLD.state <> NEW.state) EXECUTE PROCEDURE queuectl_count_update();
            UPDATE queuectl_version SET version = 4""")
        self.ok("cancel", ids[3])
        self.ok("worker", "start", "--once")
        self.assertEqual(self.q("SELECT version FROM queuectl_version"), [(queuectl.PG_SCHEMA_VERSION,)])
        self.assertIn("self_counted", self.q("""
            SELECT pg_get_triggerdef(oid) FROM pg_trigger
            WHERE tgname = 'jobs_count_update' AND tgrelid = 'jobs'::regclass""")[0][0])
        actual = dict(self.q("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        self.assertEqual(actual, {"completed": 2, "dead": 3})
        store = queuectl.open_store(self.url)
        self.addCleanup(store.close)
        expected = {state: actual.get(state, 0) for state in queuectl.STATES}
        self.assertEqual(store.counts(), expected)
        store.fold_counts()
        self.assertEqual(store.counts(), expected)

    def test_statements_are_prepared_and_survive_a_changed_table(self):
        """A statement run a few times on a connection is prepared (EXECUTE);
        a column added under it (another process's upgrade) costs one retry
        of the transaction, not an error."""
        store = queuectl.open_store(self.url)
        self.addCleanup(store.close)
        now = store.now()
        store.enqueue([{"command": "true", "cwd": self.tmp} for _ in range(6)], now=now)
        for _ in range(4):
            job = store.claim("h:1:1", now=now)
            store.finish(job["id"], job["run"], "h:1:1", queuectl.RunResult(0, "exit 0"))
        self.assertTrue(store._prepared)
        self.q("ALTER TABLE jobs ADD COLUMN added_later INTEGER")
        job = store.claim("h:1:1", now=now)
        self.assertEqual(job["state"], "processing")
        self.assertEqual(store.finish(job["id"], job["run"], "h:1:1", queuectl.RunResult(0, "exit 0"))[0],
                         "completed")
        self.assertEqual(store.counts()["completed"], 5)

    def test_clock_comes_from_the_server(self):
        """A host whose clock is 10 minutes ahead: its store's now() is the server's time."""
        store = queuectl.open_store(self.url)
        self.addCleanup(store.close)
        server = self.sql("SELECT extract(epoch FROM clock_timestamp())::FLOAT8")[0][0]
        self.assertLess(abs(store.now() - server), 1.0)
        real = time.time
        with mock.patch("time.time", lambda: real() + 600):
            store.sync_clock()
            self.assertLess(abs(store.now() - real()), 1.0)
            # `enqueue --delay 60` on that host: due 60 s from now by the server's clock;
            # `--run-at T`: due at T, an instant whatever the host's clock says.
            later = int(real()) + 3600
            at = datetime.datetime.fromtimestamp(later, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            ids = store.enqueue([queuectl.validate_job({"command": "true", "delay": 60}, self.tmp, time.time()),
                                 queuectl.validate_job({"command": "true", "run_at": at}, self.tmp, time.time())])
        run_at = dict(self.q("SELECT id, run_at FROM jobs"))
        self.assertAlmostEqual(run_at[ids[0]], real() + 60, delta=5)
        self.assertEqual(run_at[ids[1]], later)

    # -- bad input: one line, exit 1, nothing written --------------------------------

    def test_malformed_url(self):
        code, out, err = self.cli("enqueue", "--", "true", db="postgresql://u:pw@127.0.0.1:notaport/x")
        self.assert_one_line_error(code, out, err)
        self.assertNotIn(":pw@", err)
        # URLs libpq quotes back in its error, or reads a password from that a plain URL
        # parser would not: the password is never in the line.
        for db in ("postgresql://postgres:s3cretpw@[]/x", "postgresql://postgres:s3cretpw@[::1/x",
                   "postgresql://127.0.0.1/x?password=s3cret%zzpw", "postgresql://127.0.0.1/x?password=s3cretpw",
                   "postgresql://postgres:s3cret?pw@127.0.0.1:1/x", "postgresql://postgres:s3cret#pw@127.0.0.1:1/x",
                   "postgresql://postgres:s3cret/pw@127.0.0.1:1/x"):
            code, out, err = self.cli("enqueue", "--", "true", db=db)
            self.assert_one_line_error(code, out, err)
            self.assertNotIn("s3cret", err, db)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_server_down(self):
        code, out, err = self.cli("enqueue", "--", "true", db="postgresql://postgres:hunter2@127.0.0.1:1/postgres")
        self.assert_one_line_error(code, out, err, "cannot connect to postgresql://postgres:***@127.0.0.1:1/postgres")
        self.assertNotIn("hunter2", err)

    def test_another_programs_database(self):
        self.sql('CREATE SCHEMA "%s"' % self.schema)
        self.sql('CREATE TABLE "%s".jobs (id serial PRIMARY KEY, payload text)' % self.schema)
        for args in (("enqueue", "--", "true"), ("status",), ("worker", "start", "--once")):
            code, out, err = self.cli(*args)
            self.assert_one_line_error(code, out, err, "is not a queuectl database", "jobs")
        tables = self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                          (self.schema,))
        self.assertEqual(tables, [("jobs",)])
        # Tables whose names are not ours are another program's too: nothing is added beside them.
        self.sql('ALTER TABLE "%s".jobs RENAME TO customers' % self.schema)
        for args in (("enqueue", "--", "true"), ("init",), ("worker", "start", "--once")):
            code, out, err = self.cli(*args)
            self.assert_one_line_error(code, out, err, "is not a queuectl database", "customers")
        tables = self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                          (self.schema,))
        self.assertEqual(tables, [("customers",)])

    def test_a_damaged_version_table_is_one_line(self):
        self.enqueue({"command": "true"})
        for damage, says in (("DELETE FROM queuectl_version", "holds no row"),
                             ("INSERT INTO queuectl_version VALUES (2)", "holds 2, not a schema version")):
            self.sql('DELETE FROM "%s".queuectl_version' % self.schema)
            self.sql(damage.replace("queuectl_version", '"%s".queuectl_version' % self.schema))
            for args in (("status",), ("enqueue", "--", "true")):
                code, out, err = self.cli(*args)
                self.assert_one_line_error(code, out, err, "is damaged: its queuectl_version table " + says)
        self.assertEqual(self.q("SELECT COUNT(*) FROM jobs")[0][0], 1)

    def test_read_only_role(self):
        self.enqueue({"command": "true"})
        role = "qct_ro_%d" % random.randrange(10 ** 6)
        self.sql("CREATE ROLE %s LOGIN" % role)
        self.addCleanup(self.sql, "DROP ROLE IF EXISTS %s" % role)
        self.addCleanup(self.sql, 'REVOKE ALL ON ALL TABLES IN SCHEMA "%s" FROM %s' % (self.schema, role))
        self.addCleanup(self.sql, 'REVOKE ALL ON SCHEMA "%s" FROM %s' % (self.schema, role))
        self.sql('GRANT USAGE ON SCHEMA "%s" TO %s' % (self.schema, role))
        self.sql('GRANT SELECT ON ALL TABLES IN SCHEMA "%s" TO %s' % (self.schema, role))
        parts = urllib.parse.urlsplit(self.dsn)
        ro = self.with_schema(self.schema, urllib.parse.urlunsplit(
            parts._replace(netloc="%s@%s" % (role, parts.netloc.rsplit("@", 1)[-1]))))
        status = json.loads(self.ok("status", "--json", db=ro))
        self.assertEqual(status["counts"]["pending"], 1)
        code, out, err = self.cli("enqueue", "--", "true", db=ro)
        self.assert_one_line_error(code, out, err, "permission denied")
        for args in (("worker", "start", "--once"), ("worker", "start")):
            code, out, err = self.cli(*args, db=ro)
            self.assert_one_line_error(code, out, err, "cannot write database", "may not write table jobs")
        self.assertEqual(self.q("SELECT COUNT(*) FROM jobs")[0][0], 1)
        self.assertEqual(self.q("SELECT COUNT(*) FROM workers")[0][0], 0)

    def test_reading_a_new_database_writes_nothing(self):
        code, out, err = self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertIn("no database at", err)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM pg_namespace WHERE nspname = %s", (self.schema,))[0][0], 0)

    def test_no_driver_is_one_line(self):
        python = "/usr/bin/python3"
        check = subprocess.run([python, "-c", "import psycopg"], stderr=subprocess.DEVNULL)
        check2 = subprocess.run([python, "-c", "import psycopg2"], stderr=subprocess.DEVNULL)
        if check.returncode == 0 or check2.returncode == 0:
            self.skipTest("%s has a PostgreSQL driver" % python)
        code, out, err = self.cli("enqueue", "--", "true", python=python)
        self.assert_one_line_error(code, out, err, "pip install 'psycopg[binary]'")

    def test_password_never_shown(self):
        """Trust authentication ignores the password, so a URL with one works: no output shows it."""
        parts = urllib.parse.urlsplit(self.dsn)
        user = parts.username or "postgres"
        secret = "s3cr3t-%d" % random.randrange(10 ** 6)
        db = self.with_schema(self.schema, urllib.parse.urlunsplit(
            parts._replace(netloc="%s:%s@%s" % (user, secret, parts.netloc.rsplit("@", 1)[-1]))))
        job = self.ok("enqueue", "--", "true", db=db).strip()
        outputs = [self.cli("status", db=db), self.cli("status", "--json", db=db), self.cli("init", db=db),
                   self.cli("show", "nosuchjob", db=db), self.cli("worker", "start", "--once", db=db)]
        self.assertEqual(self.job(job)["state"], "completed")
        self.sql('ALTER TABLE "%s".queues RENAME TO queues_gone' % self.schema)
        outputs.append(self.cli("queue", "list", db=db))
        for code, out, err in outputs:
            self.assertNotIn(secret, out + err)
        self.assertIn(":***@", outputs[2][1] + outputs[4][2])

    def test_worker_cut_off_kills_its_job_before_the_lease_ends(self):
        """The server refuses the worker's role and drops its connection: the
        worker, unable to renew its lease, kills its job well before the lease
        (LEASE_SECONDS) could run out and another host take the job back."""
        role = "qct_cut_%d" % random.randrange(10 ** 6)
        self.sql("CREATE ROLE %s LOGIN SUPERUSER" % role)
        self.addCleanup(self.sql, "DROP ROLE IF EXISTS %s" % role)
        self.addCleanup(self.sql, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                        (role,))
        self.addCleanup(self.sql, 'DROP SCHEMA IF EXISTS "%s" CASCADE' % self.schema)   # the role owns it
        self.addCleanup(self.kill_pools)
        parts = urllib.parse.urlsplit(self.dsn)
        db = self.with_schema(self.schema, urllib.parse.urlunsplit(
            parts._replace(netloc="%s@%s" % (role, parts.netloc.rsplit("@", 1)[-1]))))
        pidfile = os.path.join(self.tmp, "pid")
        job = self.ok("enqueue", "--", "echo $$ > %s; exec sleep 60" % pidfile, db=db).strip()
        self.pool("--count", "1", db=db)
        self.until(lambda: read_file(pidfile).strip(), "the job to start")
        pid = int(read_file(pidfile))
        self.sql("ALTER ROLE %s NOLOGIN" % role)
        self.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        cut = time.monotonic()
        self.until(lambda: not os.path.exists("/proc/%d" % pid) or proc_state(pid) == b"Z",
                   "the worker to kill its job", timeout=queuectl.LEASE_SECONDS)
        self.assertLess(time.monotonic() - cut, queuectl.LEASE_SECONDS - queuectl.KILL_GRACE_SECONDS)
        self.assertIn("lease not renewed", self.pool_log())
        self.sql("ALTER ROLE %s LOGIN" % role)
        self.until(lambda: self.job(job)["state"] in ("failed", "pending"), "the run's result to be recorded")

    def test_wrong_password(self):
        """A throwaway cluster that checks passwords: a wrong one is one line, exit 1."""
        import glob
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if os.geteuid() != 0 or not bins or not shutil.which("runuser"):
            skip_or_fail(self, "a password-checking cluster needs root, runuser and Debian's postgresql")
        pgbin = os.path.dirname(bins[-1])
        base = tempfile.mkdtemp(prefix="qc-pgpw-")
        self.addCleanup(shutil.rmtree, base, True)
        shutil.chown(base, "postgres")
        with open(os.path.join(base, "pw"), "w") as f:
            f.write("right-password\n")
        shutil.chown(os.path.join(base, "pw"), "postgres")

        def as_postgres(*argv):
            subprocess.run(["runuser", "-u", "postgres", "--"] + list(argv), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

        as_postgres(os.path.join(pgbin, "initdb"), "-D", base + "/data", "-A", "scram-sha-256", "-U", "postgres",
                    "--pwfile", base + "/pw")
        port = free_port()
        as_postgres(os.path.join(pgbin, "pg_ctl"), "-D", base + "/data", "-l", base + "/log", "-w", "-o",
                    "-c listen_addresses=127.0.0.1 -p %d -k %s" % (port, base), "start")
        self.addCleanup(as_postgres, os.path.join(pgbin, "pg_ctl"), "-D", base + "/data", "-m", "immediate", "stop")
        code, out, err = self.cli("enqueue", "--", "true",
                                  db="postgresql://postgres:wrong-password@127.0.0.1:%d/postgres" % port)
        self.assert_one_line_error(code, out, err, "password authentication failed")
        self.assertNotIn("wrong-password", err)
        good = "postgresql://postgres:right-password@127.0.0.1:%d/postgres" % port
        self.assertEqual(self.cli("status", db=good)[0], 0)
        self.assertEqual(self.cli("enqueue", "--", "true", db=good)[0], 0)


    def test_dashboard_reads_postgresql(self):
        """The dashboard on a PostgreSQL URL: its pages and API answer, and the password is nowhere."""
        secret = "s3cr3t-%d" % random.randrange(10 ** 6)
        parts = urllib.parse.urlsplit(self.dsn)
        db = self.with_schema(self.schema, urllib.parse.urlunsplit(parts._replace(
            netloc="%s:%s@%s" % (parts.username or "postgres", secret, parts.netloc.rsplit("@", 1)[-1]))))
        job = self.ok("enqueue", "--", "true", db=db).strip()
        token = os.path.join(self.tmp, "token")
        port = free_port()
        log = open(os.path.join(self.tmp, "dash.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, QUEUECTL, "dashboard", "--port", str(port), "--token-file", token],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env(db), cwd=self.tmp,
                                start_new_session=True)
        self.pools.append(proc)

        def get(path):
            request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                             headers={"Authorization": "Bearer " + read_file(token).strip()})
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.read().decode()

        def up():
            try:
                return get("/api/status")
            except (OSError, urllib.error.URLError):
                return None
        status = json.loads(self.until(up, "the dashboard to answer"))
        self.assertEqual(status["counts"]["pending"], 1)
        import http.cookiejar
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        browser.open("http://127.0.0.1:%d/?token=%s" % (port, read_file(token).strip()), timeout=10).read()
        pages = [browser.open("http://127.0.0.1:%d%s" % (port, path), timeout=10).read().decode()
                 for path in ("/", "/jobs", "/jobs/" + job, "/dlq")]
        pages += [get(path) for path in ("/api/jobs", "/metrics")]
        self.assertIn(job, pages[1])
        self.assertIn(job, pages[4])
        for text in pages + [read_file(os.path.join(self.tmp, "dash.log"))]:
            self.assertNotIn(secret, text)

    def test_deadlock_is_retried(self):
        """A transaction PostgreSQL picks as a deadlock victim is run again, whole."""
        store = queuectl.open_store(self.url)
        self.addCleanup(store.close)
        a, b = store.enqueue([{"command": "true", "cwd": self.tmp}, {"command": "true", "cwd": self.tmp}])
        before = self.sql("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]
        other = self.connect(self.dsn)
        self.addCleanup(other.close)
        other.autocommit = False
        self.sql('SET search_path = "%s"' % self.schema, conn=other)
        self.sql("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (b,), conn=other)
        result = {}
        thread = threading.Thread(target=lambda: result.update(store.cancel([a, b])))
        thread.start()      # locks a, then waits for b ...
        self.until(lambda: self.sql("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")[0][0] >= 1,
                   "the cancel to wait for the row lock")
        time.sleep(0.2)
        try:                # ... while `other` wants a: one of the two is a deadlock victim
            self.sql("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (a,), conn=other)
            other.commit()
        except self.driver.Error:
            other.rollback()
        thread.join(DEADLINE)
        self.assertEqual(result, {a: "dead", b: "dead"})
        self.assertEqual(self.q("SELECT state FROM jobs ORDER BY seq"), [("dead",), ("dead",)])
        after = self.sql("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]
        self.assertGreater(after, before)


    def test_dependencies_unique_env_logs_retry(self):
        """--after, unique keys, env, logs and `retry` of a failed job, as on SQLite."""
        ledger = os.path.join(self.tmp, "ledger")
        first = self.enqueue({"command": "sleep 0.3; echo first >> %s" % ledger})
        second = self.enqueue({"command": "echo $WHO >> %s; echo out-$WHO" % ledger, "after": [first],
                               "env": {"WHO": "second"}})
        code, out, err = self.cli("enqueue", json.dumps({"command": "true", "unique": "k"}))
        self.assertEqual(code, 0, err)
        code, again, err = self.cli("enqueue", json.dumps({"command": "true", "unique": "k"}))
        self.assertEqual((code, again), (0, out), err)
        failing = self.enqueue({"command": "exit 4", "max_retries": 1})
        self.ok("config", "set", "backoff_base", "1000")
        self.ok("worker", "start", "--once")
        with open(ledger) as f:
            self.assertEqual(f.read().split(), ["first", "second"])
        self.assertIn("out-second", self.ok("logs", second))
        self.assertEqual(self.job(failing)["state"], "failed")
        self.ok("retry", failing)
        self.ok("worker", "start", "--once")
        self.assertEqual(self.job(failing)["state"], "dead")
        self.assertEqual(self.cli("enqueue", json.dumps({"command": "true", "after": ["nosuch"]}))[0], 1)


    def test_two_pools_run_each_job_once(self):
        """Two pools claiming from one queue (SKIP LOCKED): every job runs, none twice."""
        ledger = os.path.join(self.tmp, "ledger")
        jobs = "\n".join(json.dumps({"command": "echo %d >> %s" % (i, ledger), "priority": i % 3})
                         for i in range(200))
        with open(os.path.join(self.tmp, "jobs.jsonl"), "w") as f:
            f.write(jobs)
        ids = self.ok("enqueue", "--file", os.path.join(self.tmp, "jobs.jsonl")).split()
        self.pool("--count", "3")
        self.pool("--count", "3")
        self.ok("wait", *ids, timeout=120)
        with open(ledger) as f:
            runs = f.read().split()
        self.assertEqual(sorted(runs, key=int), [str(i) for i in range(200)])
        self.assertEqual(json.loads(self.ok("status", "--json"))["counts"]["completed"], 200)



class _PgTestConnection:
    """A driver connection that takes the tests' SQLite-style ? placeholders."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, params=()):
        cursor = self._conn.cursor()
        cursor.execute(sql.replace("?", "%s"), tuple(params) or None)
        return cursor

    def __getattr__(self, name):
        return getattr(self._conn, name)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (a random one may be taken: a
    RabbitMQ on 25672 made a throwaway PostgreSQL fail to start)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresBackend:
    """Mixed into a behaviour class (QueueTestCase, not @sqlite_only): the same tests on
    PostgreSQL, each database a schema of its own. Generated as <Class>OnPostgres when
    QUEUECTL_TEST_PG_DSN is set (QUEUECTL_TEST_PG_BEHAVIOUR=0 leaves them out)."""

    def setUp(self):
        self.pg_dsn = os.environ[PG_DSN_ENV]
        self.pg_driver = _pg_driver()
        if self.pg_driver is None:
            skip_or_fail(self, "no PostgreSQL driver importable by %s" % sys.executable)
        if self.is_sqlite_only():
            self.skipTest("a test of the SQLite file itself")
        super().setUp()

    def new_db(self, name):
        schema = "qcb_%d_%06d_%s" % (os.getpid(), random.randrange(10 ** 6), name)
        self.addCleanup(self._pg_admin, 'DROP SCHEMA IF EXISTS "%s" CASCADE' % schema)
        return self.pg_dsn + ("&" if "?" in self.pg_dsn else "?") + "options=-csearch_path%3D" + schema

    def _pg_admin(self, sql):
        conn = self.pg_driver.connect(self.pg_dsn)
        conn.autocommit = True
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def connect(self, db=None, readonly=True):
        conn = self.pg_driver.connect(db or self.db)
        conn.autocommit = True
        return _PgTestConnection(conn)

    def has_db_open(self, pid, path=None):
        """Has process `pid` a connection to the server (a TCP socket to its port)?"""
        if path is not None:
            return QueueTestCase.has_db_open(self, pid, path)
        port = urllib.parse.urlsplit(self.pg_dsn).port or 5432
        try:
            inodes = {os.readlink("/proc/%d/fd/%s" % (pid, fd))[8:-1] for fd in os.listdir("/proc/%d/fd" % pid)}
        except OSError:
            return False
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in read_file(table).splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
        return False

    def db_dump(self, db=None):
        conn = self.connect(db)
        try:
            cur = conn.cursor()
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                        "ORDER BY table_name")
            tables = [r[0] for r in cur.fetchall()]
            if not tables:
                return None
            dump = {"tables": tables}
            for table in tables:
                cur.execute('SELECT * FROM "%s" ORDER BY 1' % table)
                dump[table] = cur.fetchall()
            return dump
        finally:
            conn.close()


if os.environ.get(PG_DSN_ENV) and os.environ.get("QUEUECTL_TEST_PG_BEHAVIOUR", "1") == "1":
    for _name, _cls in list(globals().items()):
        if isinstance(_cls, type) and issubclass(_cls, QueueTestCase) and _cls is not QueueTestCase \
                and not _cls.SQLITE_ONLY and _name.startswith("Test"):
            globals()[_name + "OnPostgres"] = type(_name + "OnPostgres", (PostgresBackend, _cls), {})


# --------------------------------------------------------------------------------------------
# Several hosts on one PostgreSQL server (issue 7), simulated for real: every "host" is a worker
# pool in PID, UTS and mount namespaces of its own (`unshare`, root only) with its own host name;
# killing the namespace's init kills the whole host at once. They need QUEUECTL_TEST_PG_DSN (a
# database where they may create and drop schemas), root, unshare, bash and (for the clock test)
# Debian's faketime; they skip loudly without them, and fail instead under CI=true.

#: Reasons for skipping already printed (once each, not once per test).
_pg_skips_told = set()


# chaos.py (beside this file) holds the two helpers they share with it: an autocommit connection
# with psycopg 3 or psycopg2, and a URL with options=-csearch_path=SCHEMA (a queue per schema).
import chaos  # noqa: E402
pg_connect = chaos.pg_connect
pg_url_with_schema = chaos.with_search_path


class PostgresSchema:
    """Mixin: `use_postgres()` gives the test a fresh schema in the QUEUECTL_TEST_PG_DSN database
    (dropped at cleanup) and returns the URL of a queue in it."""

    def cannot_run(self, reason, even_under_ci=False):
        """Skip loudly; under CI (CI=true) fail instead, unless EVEN_UNDER_CI (no server at all:
        CI's SQLite runs have none, and its PostgreSQL run fails on a skip that names it)."""
        if os.environ.get("CI") == "true" and not even_under_ci:
            self.fail("cannot run under CI: " + reason)
        if reason not in _pg_skips_told:
            _pg_skips_told.add(reason)
            sys.stderr.write("\n*** SKIPPED PostgreSQL tests: %s ***\n" % reason)
        self.skipTest(reason)

    def need_postgres(self):
        """Skip now unless QUEUECTL_TEST_PG_DSN is set (before any other setup)."""
        self.dsn = os.environ.get(PG_DSN_ENV)
        if not self.dsn:
            self.cannot_run("%s not set: no PostgreSQL server to test against" % PG_DSN_ENV,
                            even_under_ci=True)

    def use_postgres(self):
        self.need_postgres()
        try:
            self.admin = pg_connect(self.dsn)
        except ImportError:
            self.cannot_run("neither psycopg nor psycopg2 is importable (the PostgreSQL driver)")
        self.addCleanup(self.admin.close)
        self.schema = "qctl_test_%d_%s" % (os.getpid(), "".join(random.choice("abcdefghij") for _ in range(8)))
        self.sql("CREATE SCHEMA %s" % self.schema)
        self.addCleanup(self.sql, "DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
        self.url = pg_url_with_schema(self.dsn, self.schema)
        return self.url

    def sql(self, query, params=()):
        """Run one statement on the test's own connection; its rows, if it returns any."""
        with self.admin.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None

    def assert_queue_in_schema(self):
        """The queue lives in the test's schema on the server (not, say, in a file named like the URL)."""
        tables = self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                          (self.schema,))
        self.assertTrue(tables, "queuectl --db %s wrote no table into schema %s" % (self.url, self.schema))


class CrossHostTestCase(PostgresSchema, unittest.TestCase):
    """A fresh schema per test on the server, a temp dir, and `host()` to start a worker pool as
    another machine."""

    def setUp(self):
        self.need_postgres()
        if not LINUX or os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("bash"):
            self.cannot_run("cross-host tests need Linux, root, unshare and bash (hosts are namespaces)")
        if subprocess.run(["unshare", "--pid", "--uts", "--fork", "--mount-proc", "true"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            self.cannot_run("unshare --pid --uts --fork --mount-proc does not work here")
        self.use_postgres()
        self.dir = tempfile.mkdtemp(prefix="qctl-xhost-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ledger = os.path.join(self.dir, "ledger")
        self.hosts = {}
        self.addCleanup(self.kill_all_hosts)

    def cli(self, *args, input=None, check=True, prefix=()):
        """Run `queuectl --db URL ARGS` as a separate process; returns stdout."""
        proc = subprocess.run(list(prefix) + [sys.executable, QUEUECTL, "--db", self.url] + list(args),
                              input=input, capture_output=True, text=True, timeout=DEADLINE * 2,
                              cwd=self.dir)
        if check and proc.returncode != 0:
            self.fail("queuectl %s exited %d: %s" % (" ".join(args), proc.returncode,
                                                     (proc.stderr or proc.stdout).strip()[-2000:]))
        self.assertNotIn("Traceback", proc.stderr)
        return proc.stdout

    def status(self):
        return json.loads(self.cli("status", "--json"))


    def lease_seconds(self, wanted):
        """Set a lease config key to `wanted` seconds if queuectl has one; returns the lease in force."""
        keys = [line.split()[0] for line in self.cli("config", "list").splitlines()[1:] if line.strip()]
        for key in keys:
            if key.startswith("lease"):
                self.cli("config", "set", key, str(wanted))
                return float(wanted)
        return float(queuectl.LEASE_SECONDS)

    def job_script(self, name, body=""):
        """DIR/NAME, a bash script for jobs: ledger lines 'S id host attempt time', BODY, 'E id host time'.

        The host is the one the test gave the pool (QUEUECTL_TEST_HOST), checked against the
        namespace's host name; times are this machine's one real clock (bash's EPOCHREALTIME,
        no fork). Each line is one append, atomic on a local file."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("""now() { t=$EPOCHREALTIME; echo "${t/,/.}"; }
h=${QUEUECTL_TEST_HOST:-none}
[ "$h" = none ] || [ "$(hostname)" = "$h" ] || h="$h-but-hostname-is-$(hostname)"
echo "S $QUEUECTL_JOB_ID $h ${QUEUECTL_ATTEMPT:-?} $(now)" >> %(ledger)s
%(body)s
echo "E $QUEUECTL_JOB_ID $h $(now)" >> %(ledger)s
""" % {"ledger": shlex.quote(self.ledger), "body": body})
        return path

    def read_ledger(self):
        """{job id: [[host, start, end or None], ...] in order of start}."""
        runs = {}
        try:
            with open(self.ledger) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return runs
        for line in lines:
            fields = line.split()
            if len(fields) == 5 and fields[0] == "S":
                runs.setdefault(fields[1], []).append([fields[2], float(fields[4]), None])
            elif len(fields) == 4 and fields[0] == "E":
                open_runs = [r for r in runs.get(fields[1], []) if r[0] == fields[2] and r[2] is None]
                self.assertTrue(open_runs, "ledger: an end without a start: %r" % line)
                open_runs[-1][2] = float(fields[3])
            elif line.strip():
                self.fail("ledger: a torn or unknown line: %r" % line)
        for job_runs in runs.values():
            job_runs.sort(key=lambda r: r[1])
        return runs

    def host(self, name, *worker_args, outer=(), boot_id=None):
        """Start `worker start WORKER_ARGS` as host NAME: new PID, UTS and mount namespaces whose
        init is a shell that sets the host name (and, given BOOT_ID, mounts a file with it over
        the kernel's boot id: another machine of the same name) and runs the pool; OUTER (a
        command prefix) runs unshare. Returns the process started here."""
        log = open(os.path.join(self.dir, "host-%s.log" % name), "wb")
        self.addCleanup(log.close)
        env = dict(os.environ, QUEUECTL_TEST_HOST=name)
        env.pop("QUEUECTL_DB", None)
        boot = []
        if boot_id is not None:
            boot = [os.path.join(self.dir, "boot_id-%s" % name)]
            with open(boot[0], "w") as f:
                f.write(boot_id + "\n")
        argv = list(outer) + ["unshare", "--pid", "--uts", "--fork", "--mount-proc", "sh", "-c",
                'hostname "$1" && shift && if [ -n "$1" ]; then mount --bind "$1" '
                '/proc/sys/kernel/random/boot_id || exit; fi && shift && "$@"', "sh", name] + \
               (boot or [""]) + [sys.executable, QUEUECTL, "--db", self.url, "worker", "start"] + list(worker_args)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=self.dir)
        self.hosts[name] = proc
        return proc

    def host_init(self, proc):
        """The pid (as we see it) of the namespace's init: the first descendant of `proc` in
        another PID namespace than ours."""
        ours = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            todo = [proc.pid]
            while todo:
                pid = todo.pop(0)
                try:
                    if os.readlink("/proc/%d/ns/pid" % pid) != ours:
                        return pid
                except OSError:
                    continue
                todo += [int(c) for c in read_proc(pid, "task/%d/children" % pid).split()]
            if proc.poll() is not None:
                self.fail("host exited early (%s): %s" % (proc.returncode, self.host_log(proc)))
            time.sleep(0.01)
        self.fail("no init in the host's namespace after %ss" % DEADLINE)

    def host_log(self, proc):
        for name, p in self.hosts.items():
            if p is proc:
                with open(os.path.join(self.dir, "host-%s.log" % name), "rb") as f:
                    return f.read().decode(errors="replace")[-3000:]
        return ""

    def kill_host(self, name):
        """SIGKILL the host's init: the kernel kills every process in its PID namespace, and
        unshare returns only when all are gone. Returns the time when they were."""
        proc = self.hosts[name]
        os.kill(self.host_init(proc), signal.SIGKILL)
        proc.wait(timeout=DEADLINE)
        return time.time()

    def kill_all_hosts(self):
        for name, proc in self.hosts.items():
            if proc.poll() is None:
                try:
                    self.kill_host(name)
                except (AssertionError, OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()

    def wait_until(self, predicate, timeout, message):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for name, proc in self.hosts.items():
                if proc.poll() is not None and not getattr(proc, "killed_by_test", False):
                    self.fail("host %s exited (%s) while waiting for %s: %s"
                              % (name, proc.returncode, message, self.host_log(proc)))
            time.sleep(0.1)
        self.fail("timed out after %ss waiting for %s; status: %s" % (timeout, message, self.status()))


class TestCrossHostPostgres(CrossHostTestCase):
    """Two machines drain one queue; one of them dies mid-drain."""

    JOBS = 1000
    WORKERS_PER_HOST = 4

    def test_a_host_killed_mid_drain_loses_no_job_and_runs_none_twice_at_once(self):
        lease = self.lease_seconds(5)
        # A job taken back is due again at once (no backoff): "back within lease + 5 s" is then
        # the reclaim's own delay, not a retry delay that depends on the configuration.
        self.cli("config", "set", "backoff_max", "0")
        script = self.job_script("job.sh", "sleep 0.1")
        self.cli("enqueue", "--file", "-",
                 input="".join(json.dumps({"command": "bash " + shlex.quote(script)}) + "\n"
                               for _ in range(self.JOBS)))
        self.assertEqual(self.status()["counts"]["pending"], self.JOBS)
        self.assert_queue_in_schema()
        self.host("hostA", "--count", str(self.WORKERS_PER_HOST))
        self.host("hostB", "--count", str(self.WORKERS_PER_HOST))

        def mid_drain_with_hostB_busy():
            runs = self.read_ledger()
            ended = sum(1 for job_runs in runs.values() for r in job_runs if r[2] is not None)
            hosts = {r[0] for job_runs in runs.values() for r in job_runs}
            busy_b = [r for job_runs in runs.values() for r in job_runs if r[0] == "hostB" and r[2] is None]
            return ended >= self.JOBS * 0.3 and hosts == {"hostA", "hostB"} and busy_b

        self.wait_until(mid_drain_with_hostB_busy, 240, "30% drained by both hosts, hostB running a job")
        self.hosts["hostB"].killed_by_test = True
        kill_sent = time.time()
        killed_at = self.kill_host("hostB")

        self.wait_until(lambda: self.status()["counts"]["completed"] == self.JOBS, 300,
                        "all %d jobs completed on hostA" % self.JOBS)
        counts = self.status()["counts"]
        self.assertEqual(counts, dict(counts, pending=0, processing=0, failed=0, dead=0))

        runs = self.read_ledger()
        self.assertEqual(len(runs), self.JOBS, "jobs that ran at least once")
        came_back = {}
        for job_id, job_runs in runs.items():
            hosts = {r[0] for r in job_runs}
            self.assertLessEqual(hosts, {"hostA", "hostB"}, job_id)
            *earlier, last = job_runs
            self.assertIsNotNone(last[2], "job %s: its last run did not finish: %r" % (job_id, job_runs))
            self.assertTrue(last[0] == "hostA" or last[1] < kill_sent,
                            "job %s ran on the killed host after it was killed: %r" % (job_id, job_runs))
            for run in earlier:
                # Ran twice: only a run in flight on the killed host may be run again.
                self.assertEqual(run[0], "hostB", "job %s ran twice: %r" % (job_id, job_runs))
                self.assertLess(run[1], kill_sent, "job %s: %r" % (job_id, job_runs))
                # No overlap: a run still going when hostB died ended when hostB did.
                end = run[2] if run[2] is not None else killed_at
                self.assertLessEqual(end, last[1], "job %s: two runs overlap: %r" % (job_id, job_runs))
            if earlier:
                came_back[job_id] = last[1] - kill_sent
        in_flight = [j for j, job_runs in runs.items() if any(r[0] == "hostB" and r[2] is None for r in job_runs)]
        self.assertTrue(in_flight, "no job was in flight on hostB when it was killed (the test proved nothing)")
        self.assertLessEqual(set(in_flight), set(came_back))
        self.assertLessEqual(len(came_back), self.WORKERS_PER_HOST,
                             "more jobs ran twice than hostB had workers: %s" % sorted(came_back))
        for job_id, after in came_back.items():
            self.assertLessEqual(after, lease + 5,
                                 "job %s came back %.1fs after hostB died (lease %ss)" % (job_id, after, lease))
        sys.stderr.write("[%d jobs in flight on hostB came back after %s s] " % (
            len(came_back), ", ".join("%.1f" % t for t in sorted(came_back.values()))))


class TestHostLivenessPostgres(CrossHostTestCase):
    """What a worker can tell of another one on a shared PostgreSQL: a pid is proof only on this
    very machine; a host that is gone is known by its silence, and not waited for forever."""

    def long_job(self, release):
        """A job (its id) that runs until the file RELEASE exists (at most a minute)."""
        script = self.job_script("long.sh", "n=0; while [ ! -e %s ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done"
                                 % shlex.quote(release))
        [job] = self.cli("enqueue", "--", "bash", script).split()
        return job

    def local_pool(self, *worker_args):
        """`worker start WORKER_ARGS` on this machine as it is (no namespace); killed at cleanup."""
        log = open(os.path.join(self.dir, "local.log"), "wb")
        self.addCleanup(log.close)
        env = dict(os.environ)
        env.pop("QUEUECTL_DB", None)
        proc = subprocess.Popen([sys.executable, QUEUECTL, "--db", self.url, "worker", "start"] + list(worker_args),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=self.dir)

        def kill():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(DEADLINE)
        self.addCleanup(kill)
        return proc

    def worker_stop(self, timeout):
        proc = subprocess.run([sys.executable, QUEUECTL, "--db", self.url, "worker", "stop", "--timeout", str(timeout)],
                              capture_output=True, text=True, timeout=timeout + DEADLINE, cwd=self.dir)
        self.assertEqual(proc.stdout, "")
        return proc.returncode, proc.stderr

    def job(self, job_id):
        return json.loads(self.cli("show", job_id, "--json"))

    def test_a_machine_with_our_host_name_and_another_boot_id_is_not_taken_for_dead(self):
        # Cloned VMs, containers all named localhost: same host name, another boot id. Our
        # worker took the other one's live job back every few seconds ("worker lost"), status
        # called it lost and `worker stop` deleted its row.
        me = queuectl.this_host()
        release = os.path.join(self.dir, "release")
        job = self.long_job(release)
        self.host(me, "--count", "1", boot_id="0badb007-0000-4000-8000-%012d" % os.getpid())
        self.wait_until(lambda: job in self.read_ledger(), DEADLINE, "the other machine to start the job")
        [other] = self.status()["workers"]
        self.assertEqual(other["host"], me)
        local = self.local_pool("--count", "1")
        # Idle, our worker looks for lost jobs at each heartbeat: watch three go by.
        beats = set()

        def three_beats_of_ours():
            for w in self.status()["workers"]:
                if w["id"] != other["id"]:
                    beats.add(w["heartbeat_at"])
            return len(beats) >= 4

        self.wait_until(three_beats_of_ours, DEADLINE, "three heartbeats of our worker")
        workers = self.status()["workers"]
        self.assertEqual([(w["host"], w["alive"]) for w in workers], [(me, True), (me, True)], workers)
        self.assertEqual((self.job(job)["state"], self.job(job)["attempts"]), ("processing", 1))
        self.assertEqual(len(self.read_ledger()[job]), 1)
        # `worker stop` asks both and waits for both: the other machine's worker finishes its job.
        stop = subprocess.Popen([sys.executable, QUEUECTL, "--db", self.url, "worker", "stop", "--timeout", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.dir)
        self.addCleanup(stop.wait, DEADLINE)
        self.addCleanup(stop.kill)
        self.wait_until(lambda: [(w["id"], w["stopping"]) for w in self.status()["workers"]] == [(other["id"], True)],
                        DEADLINE, "our idle worker to stop and the other one to stay, asked to stop")
        self.assertEqual(local.wait(DEADLINE), 0)
        self.hosts[me].killed_by_test = True
        with open(release, "w"):
            pass
        out, err = stop.communicate(timeout=DEADLINE)
        self.assertEqual((stop.returncode, out), (0, ""), err)
        self.assertEqual(err, "queuectl: asked 2 workers to stop; waiting for running jobs to finish\n"
                              "queuectl: stopped 2 workers\n")
        self.assertEqual(self.hosts[me].wait(DEADLINE), 0)
        self.assertEqual((self.job(job)["state"], self.job(job)["attempts"]), ("completed", 1))
        [run] = self.read_ledger()[job]
        self.assertEqual(run[0], me)
        with open(os.path.join(self.dir, "local.log")) as f:
            self.assertNotIn("worker lost", f.read())

    def kill_a_host_holding_a_job(self, name, count, release, then=lambda: None):
        """Host NAME with COUNT workers, one running a long job, killed once it has renewed the
        lease (and THEN() has run); returns the job's id."""
        job = self.long_job(release)
        self.host(name, "--count", str(count))
        self.wait_until(lambda: job in self.read_ledger(), DEADLINE, "%s to start the job" % name)
        started = self.job(job)["runs"][0]["started_at"]
        self.wait_until(lambda: any(w["job"] == job and w["heartbeat_at"] > started for w in self.status()["workers"]),
                        DEADLINE, "a heartbeat after the claim")
        then()
        self.hosts[name].killed_by_test = True
        self.kill_host(name)
        return job

    def test_a_dead_hosts_workers_are_forgotten_by_the_others(self):
        # Only workers of this host (provably dead) were forgotten; another host's stayed
        # listed as lost, and waited for by `worker stop`, for 10 minutes.
        self.cli("config", "set", "backoff_max", "0")
        release = os.path.join(self.dir, "release")
        job = self.kill_a_host_holding_a_job("hostB", 2, release, then=lambda: (
            self.host("hostA", "--count", "1"),
            self.wait_until(lambda: len(self.status()["workers"]) == 3, DEADLINE, "hostA's worker")))
        with open(release, "w"):
            pass
        # hostA takes the job back when its lease expires and forgets hostB's workers: not
        # heard of for a lease, holding no lease that has not expired.
        self.wait_until(lambda: [w["host"] for w in self.status()["workers"]] == ["hostA"],
                        queuectl.LEASE_SECONDS + 10, "hostB's workers to be forgotten")
        self.wait_until(lambda: self.job(job)["state"] == "completed", DEADLINE, "the job to complete on hostA")
        self.assertEqual([r["outcome"] for r in self.job(job)["runs"]], ["worker lost", "exit 0"])
        self.assertEqual([r[0] for r in self.read_ledger()[job]], ["hostB", "hostA"])
        self.hosts["hostA"].killed_by_test = True
        self.assertEqual(self.worker_stop(DEADLINE), (0, "queuectl: asked 1 worker to stop; waiting for running "
                                                         "jobs to finish\nqueuectl: stopped 1 worker\n"))
        self.assertEqual(self.hosts["hostA"].wait(DEADLINE), 0)

    def test_worker_stop_does_not_wait_for_a_dead_host(self):
        # `worker stop` waited for a dead host's workers until its timeout (or for ever).
        self.cli("config", "set", "backoff_max", "0")
        release = os.path.join(self.dir, "release")
        job = self.kill_a_host_holding_a_job("hostB", 2, release)
        with open(release, "w"):
            pass
        code, err = self.worker_stop(queuectl.LEASE_SECONDS + 10)
        self.assertEqual(code, 0, err)
        lines = err.splitlines()
        self.assertEqual(lines[0], "queuectl: asked 2 workers to stop; waiting for running jobs to finish")
        self.assertEqual(sorted(re.sub(r"hostB:\d+:\d+", "W", re.sub(r"for \d+s", "for Ns", line))
                                for line in lines[1:3]),
                         ["queuectl: not waiting for worker W: no heartbeat for Ns",
                          "queuectl: not waiting for worker W: no heartbeat for Ns; "
                          "its job %s is taken back once its lease expires" % job])
        self.assertEqual(lines[3:], ["queuectl: stopped 0 workers; 2 lost"])
        # Both forgotten (the job's lease had expired too); the job is taken back by the next worker.
        self.assertEqual(self.status()["workers"], [])
        self.assertEqual(self.job(job)["state"], "processing")
        self.cli("worker", "start", "--once")
        self.assertEqual([r["outcome"] for r in self.job(job)["runs"]], ["worker lost", "exit 0"])
        self.assertEqual(self.worker_stop(DEADLINE), (0, "queuectl: no workers running\n"))


class TestClockSkewPostgres(CrossHostTestCase):
    """A host whose clock is 10 minutes ahead (faketime) goes by the server's clock."""

    def ten_minutes_ahead(self):
        """The argv prefix that runs a command with the clock 10 minutes ahead."""
        if not shutil.which("faketime"):
            self.cannot_run("the clock-skew test needs Debian's faketime")
        skew = ["faketime", "-f", "+10m"]
        probe = subprocess.run(skew + [sys.executable, "-c", "import time; print(time.time())"],
                               capture_output=True, text=True)
        if probe.returncode != 0 or float(probe.stdout) - time.time() < 590:
            self.cannot_run("faketime does not move Python's clock here: %s" % probe.stderr.strip())
        return skew

    def test_a_host_ten_minutes_ahead_runs_nothing_early_and_steals_no_live_lease(self):
        # Around unshare, not inside: faketime names its shared memory after its pid, and pids
        # repeat across PID namespaces (sem_open: File exists); it removes it when it exits.
        skew = self.ten_minutes_ahead()
        self.lease_seconds(5)
        release = os.path.join(self.dir, "release")
        script = self.job_script("job.sh")
        long_script = self.job_script("long.sh", "n=0; while [ ! -e %s ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done"
                                      % shlex.quote(release))

        # hostA (right clock) holds a long job's lease.
        [held] = self.cli("enqueue", "--", "bash", long_script).split()
        self.assert_queue_in_schema()
        self.host("hostA", "--count", "1")
        self.wait_until(lambda: held in self.read_ledger(), DEADLINE, "hostA to start the long job")
        # Due in 5 minutes by the server's clock, long past by the skewed host's; and first in line.
        [delayed] = self.cli("enqueue", "--delay", "5m", "-p", "10", "--", "bash", script).split()
        # hostB, 10 minutes ahead, starts: it looks for lost leases, then claims.
        self.host("hostB", "--count", "1", outer=skew)
        [first] = self.cli("enqueue", "--", "bash", script).split()
        self.wait_until(lambda: self.job(first)["state"] == "completed", DEADLINE, "hostB to run a due job")
        self.assertEqual(self.read_ledger()[first][0][0], "hostB")
        # Idle, hostB looks for lost leases again at its heartbeats; watch two go by.
        beats = set()

        def two_beats_of_hostB():
            for worker in self.status()["workers"]:
                if worker.get("host") == "hostB":
                    beats.add(worker["heartbeat_at"])
            return len(beats) >= 3

        self.wait_until(two_beats_of_hostB, DEADLINE, "two heartbeats of hostB")
        [second] = self.cli("enqueue", "--", "bash", script).split()
        self.wait_until(lambda: self.job(second)["state"] == "completed", DEADLINE, "hostB to run a second job")

        self.assertEqual(self.job(delayed)["state"], "pending", "hostB ran the delayed job early")
        self.assertEqual(self.job(delayed)["attempts"], 0)
        self.assertNotIn(delayed, self.read_ledger())
        job = self.job(held)
        self.assertEqual((job["state"], job["attempts"]), ("processing", 1), "hostB took hostA's live lease")
        self.assertEqual(len(self.read_ledger()[held]), 1)
        with open(release, "w"):
            pass
        self.wait_until(lambda: self.job(held)["state"] == "completed", DEADLINE, "the long job to finish")
        [run] = self.read_ledger()[held]
        self.assertEqual(run[0], "hostA")
        self.assertIsNotNone(run[2])

    def test_the_dashboard_of_a_host_ten_minutes_ahead_goes_by_the_servers_clock(self):
        """Purge 'older than 5m' from a dashboard whose clock is 10 minutes ahead keeps a job
        that finished seconds ago (by the server's clock)."""
        skew = self.ten_minutes_ahead()
        [job] = self.cli("enqueue", "--", "true").split()
        self.cli("worker", "start", "--once")
        self.assertEqual(self.job(job)["state"], "completed")
        proc = subprocess.Popen(skew + [sys.executable, QUEUECTL, "--db", self.url, "dashboard", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.dir,
                                start_new_session=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, DEADLINE)
        self.addCleanup(kill_session, proc.pid)     # faketime's child too, not faketime alone
        line = proc.stdout.readline().decode()
        m = re.match(r"^http://([^/]+):(\d+)/\?token=([A-Za-z0-9_-]+)$", line.strip())
        self.assertTrue(m, "first line is not the dashboard's URL: %r" % line)
        base = "http://127.0.0.1:%s" % m.group(2)

        def purge(older_than):
            data = urllib.parse.urlencode({"state": "completed", "older_than": older_than}).encode()
            req = urllib.request.Request(base + "/actions/purge", data=data, method="POST", headers={
                "Cookie": "queuectl_%s=%s" % (m.group(2), m.group(3)), "Origin": base,
                "Content-Type": "application/x-www-form-urlencoded"})
            try:
                with _HTTP.open(req, timeout=DEADLINE) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        self.assertEqual(purge("5m"), 303)
        self.assertEqual(self.job(job)["state"], "completed", "purged by the host's clock, not the server's")
        self.assertEqual(purge("0"), 303)
        self.assertNotEqual(subprocess.run([sys.executable, QUEUECTL, "--db", self.url, "show", job],
                                           capture_output=True).returncode, 0)

    def job(self, job_id):
        return json.loads(self.cli("show", job_id, "--json"))


class ContentionPostgresTest(PostgresSchema, ContentionTest):
    """ContentionTest with the queue on PostgreSQL: sixteen enqueuers while a pool drains.
    (Redundant once every QueueTestCase class also runs on PostgreSQL through new_db.)"""

    def setUp(self):
        self.need_postgres()
        super().setUp()

    def new_db(self, name):
        return self.use_postgres()

    def tearDown(self):
        self.assert_queue_in_schema()


class ChaosPostgresTest(PostgresSchema, unittest.TestCase):
    """chaos.py's short run with the queue on PostgreSQL (chaos.py --db URL)."""

    def test_chaos_short_run(self):
        if not LINUX:
            self.skipTest("needs Linux /proc")
        self.need_postgres()
        out = io.StringIO()
        code = chaos.main(["--jobs", "60", "--seconds", "8", "--quiet", "--db", self.dsn], out=out)
        self.assertEqual(code, 0, "chaos run failed:\n" + out.getvalue())


class FreezableProxy:
    """A TCP forwarder to the PostgreSQL server, in threads of this process, that freeze() stops
    dead: it reads, forwards and accepts nothing more but keeps every socket open, so the kernel
    still acknowledges what is sent (as with a SIGSTOPped proxy or PgBouncer: no TCP timeout
    fires). thaw() lets it go on where it stopped."""

    def __init__(self, host, port):
        import socket
        self.target = (host, port)
        self.frozen = threading.Event()
        self.closed = False
        self.sockets = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self):
        self.frozen.set()

    def thaw(self):
        self.frozen.clear()

    def close(self):
        self.closed = True
        self.thaw()
        for sock in [self.listener] + self.sockets:
            sock.close()

    def _hold(self):
        while self.frozen.is_set() and not self.closed:
            time.sleep(0.02)

    def _accept(self):
        import socket
        while not self.closed:
            self._hold()
            try:
                client = self.listener.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=DEADLINE)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        import select
        try:
            while not self.closed:
                self._hold()
                if not select.select([src], [], [], 0.05)[0] or self.frozen.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                self._hold()
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass


def _process_gone(pid):
    """Has the process exited (gone, or a zombie not yet reaped)?"""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class TestFrozenConnectionPostgres(PostgresSchema, unittest.TestCase):
    """Issue 7, contract item 4, when the connection stays up but nothing answers (a frozen proxy
    or PgBouncer, a paused server): the worker still kills its job before its lease runs out, and
    a CLI call fails in one line instead of hanging."""

    def proxied(self, url, port):
        """URL with its host and port replaced by 127.0.0.1:PORT."""
        parts = urllib.parse.urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=(user + "@" if user else "") + "127.0.0.1:%d" % port))

    def test_a_worker_cut_off_by_a_frozen_proxy_kills_its_job_before_the_lease_runs_out(self):
        if not LINUX:
            self.skipTest("needs Linux /proc")
        url = self.use_postgres()
        parts = urllib.parse.urlsplit(self.dsn)
        if not parts.hostname or parts.hostname.startswith("/"):
            self.cannot_run("the frozen-proxy test needs a TCP host in %s" % PG_DSN_ENV)
        proxy = FreezableProxy(parts.hostname, parts.port or 5432)
        self.addCleanup(proxy.close)
        via = self.proxied(url, proxy.port)
        tmp = tempfile.mkdtemp(prefix="qctl-frozen-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pidfile, second = os.path.join(tmp, "pid"), os.path.join(tmp, "second")

        def cli(*args, db=url):
            proc = subprocess.run([sys.executable, QUEUECTL, "--db", db] + list(args), capture_output=True,
                                  text=True, timeout=DEADLINE, cwd=tmp)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            return proc.stdout

        # The retry after a lost lease is due at once. The first run records its pid and sleeps;
        # the second finishes at once, saying when it started (this machine's clock).
        cli("config", "set", "backoff_max", "0")
        cli("enqueue", "--id", "FZ1", "--", "if [ -e %s ]; then date +%%s.%%N >> %s; exit 0; fi; : > %s; "
            "echo $$ > %s; exec sleep 60" % tuple(shlex.quote(p) for p in (pidfile, second, pidfile, pidfile)))
        log = open(os.path.join(tmp, "worker.log"), "wb")
        self.addCleanup(log.close)
        worker = subprocess.Popen([sys.executable, QUEUECTL, "--db", via, "worker", "start", "--count", "1"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=tmp)

        def stop_worker():
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        self.addCleanup(stop_worker)

        def worker_log():
            with open(os.path.join(tmp, "worker.log"), "rb") as f:
                return f.read().decode(errors="replace")

        def wait_for(predicate, seconds, what):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                value = predicate()
                if value:
                    return value
                time.sleep(0.05)
            self.fail("timed out after %ss waiting for %s; worker log:\n%s" % (seconds, what, worker_log()))

        pid = wait_for(lambda: int(read_file(pidfile) or 0), DEADLINE, "the job to start")
        # A CLI call connected through the proxy before it froze.
        waiter = subprocess.Popen([sys.executable, QUEUECTL, "--db", via, "wait", "FZ1"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=tmp)
        self.addCleanup(lambda: waiter.poll() is None and (waiter.kill(), waiter.wait()))
        time.sleep(1.0)
        self.assertIsNone(waiter.poll(), waiter.stderr.read() if waiter.poll() is not None else "")
        proxy.freeze()
        frozen_at = time.monotonic()

        # `wait` fails in one line within seconds (a new connection cannot be made either).
        try:
            out, err = waiter.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("`queuectl wait` through the frozen proxy still hangs after 20 s")
        took = time.monotonic() - frozen_at
        self.assertNotEqual(waiter.returncode, 0)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("lost the connection", err)
        self.assertLess(took, 12.0, err)

        # The job's process is gone well before its lease (renewed at most when the proxy froze)
        # runs out, while the worker still cannot reach the server.
        wait_for(lambda: _process_gone(pid), queuectl.LEASE_SECONDS - 5 - (time.monotonic() - frozen_at),
                 "the job's process to be killed")
        killed_after = time.monotonic() - frozen_at
        killed_at = time.time()
        self.assertLess(killed_after, queuectl.LEASE_GIVE_UP_SECONDS + 3.0)
        # Meanwhile nobody else took the job: one run, still open.
        runs = self.sql("SELECT run, finished_at FROM %s.runs WHERE job_id = 'FZ1'" % self.schema)
        self.assertEqual(runs, [(1, None)])

        proxy.thaw()
        wait_for(lambda: self.sql("SELECT state FROM %s.jobs WHERE id = 'FZ1'" % self.schema)[0][0] == "completed",
                 DEADLINE, "the job to complete after the proxy thawed")
        runs = self.sql("SELECT run, started_at, finished_at, outcome, result_state FROM %s.runs "
                        "WHERE job_id = 'FZ1' ORDER BY run" % self.schema)
        self.assertEqual([(r[0], r[3], r[4]) for r in runs], [(1, "lease lost", "failed"), (2, "exit 0", "completed")],
                         worker_log())
        self.assertLessEqual(runs[0][2], runs[1][1], "two runs overlap: %r" % (runs,))
        starts = read_file(second).split()
        self.assertEqual(len(starts), 1, "the second run ran %d times" % len(starts))
        self.assertGreater(float(starts[0]), killed_at)
        self.assertIn("lease not renewed", worker_log())
        sys.stderr.write("[wait failed after %.1f s; job killed %.1f s after the freeze] " % (took, killed_after))


if __name__ == "__main__":
    unittest.main()


def load_tests(loader, tests, pattern):
    """QUEUECTL_TEST_PG_ONLY=1 (with QUEUECTL_TEST_PG_DSN): only the PostgreSQL classes, for a run
    whose SQLite half another run already covers (.ci/run's PostgreSQL run)."""
    if os.environ.get("QUEUECTL_TEST_PG_ONLY") != "1":
        return tests

    def cases(suite):
        for test in suite:
            if isinstance(test, unittest.TestSuite):
                yield from cases(test)
            else:
                yield test
    return unittest.TestSuite(t for t in cases(tests) if "Postgres" in type(t).__name__)
