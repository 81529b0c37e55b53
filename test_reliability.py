"""Reliability tests for queuectl: chaos, contention, shutdown, bad input.

Every test drives the real command line (`python queuectl.py --db X ...`) in
subprocesses, with real workers and real shell commands. Each test class is
self-contained on top of the small helpers below (unittest only; pytest runs
them too). Linux only: processes are found through /proc.

    python3 -m unittest -v test_reliability
    python3 -m pytest -q test_reliability.py
"""

import io
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUECTL = os.path.join(HERE, "queuectl.py")
LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")


# -- helpers ---------------------------------------------------------------------

def _env(extra=None):
    env = dict(os.environ)
    env.pop("QUEUECTL_DB", None)
    env.pop("QUEUECTL_BUSY_TIMEOUT", None)
    env.update(extra or {})
    return env


def qc(db, *args, stdin=None, env=None, timeout=60):
    """Run `queuectl --db DB ARGS...`; returns (exit code, stdout bytes, stderr bytes)."""
    r = subprocess.run([sys.executable, QUEUECTL, "--db", db] + list(args), input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env), timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def qc_ok(test, db, *args, **kw):
    code, out, err = qc(db, *args, **kw)
    test.assertEqual(code, 0, "queuectl %s failed: %s" % (" ".join(args), err.decode(errors="replace")))
    return out.decode()


def wait_until(predicate, timeout, what="condition", interval=0.05):
    """Poll `predicate` until it returns a true value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
        time.sleep(interval)


def db_jobs(db):
    """{id: row dict} of every job, read directly (read-only)."""
    conn = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
    finally:
        conn.close()


def db_runs(db, job_id):
    conn = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT run, attempt, outcome, exit_code FROM runs WHERE job_id = ? ORDER BY run", (job_id,))]
    finally:
        conn.close()


def db_dump(path):
    """Everything in a database, for before/after comparisons: the schema, every
    row of every table and user_version. Opened read-only."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=30)
    try:
        lines = list(conn.iterdump())
        lines.append("user_version=%d" % conn.execute("PRAGMA user_version").fetchone()[0])
        return lines
    finally:
        conn.close()


def file_state(path):
    """Bytes and mtime of a file and which of its -wal/-shm companions exist."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    return (data, os.stat(path).st_mtime_ns,
            [s for s in ("-wal", "-shm", "-journal") if os.path.exists(path + s)])


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid):
    """Alive and not a zombie."""
    stat = _read("/proc/%d/stat" % pid)
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def pids_with_marker(marker):
    """Live processes whose command line contains `marker`."""
    m = marker.encode()
    me = os.getpid()
    return [p for p in _pids() if p != me and m in _read("/proc/%d/cmdline" % p) and _alive(p)]


def pids_of_db(db):
    """Live processes started by a worker of `db` (QUEUECTL_DB in their environment)."""
    m = b"\0QUEUECTL_DB=" + os.path.abspath(db).encode() + b"\0"
    me = os.getpid()
    return [p for p in _pids() if p != me and m in b"\0" + _read("/proc/%d/environ" % p) and _alive(p)]


def pids_of_group(pgid):
    out = []
    for p in _pids():
        stat = _read("/proc/%d/stat" % p)
        if stat:
            fields = stat.rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":
                out.append(p)
    return out


def children(pid):
    """Live child processes of `pid` (a pool's workers, under the fork start method)."""
    out = []
    for p in _pids():
        stat = _read("/proc/%d/stat" % p)
        if stat:
            fields = stat.rsplit(b")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != b"Z":
                cmd = _read("/proc/%d/cmdline" % p)
                if b"forkserver" not in cmd and b"resource_tracker" not in cmd:
                    out.append(p)
    return out


def is_zombie(pid):
    stat = _read("/proc/%d/stat" % pid)
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] == b"Z"


def kill_all(pids):
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def new_marker():
    """A unique `sleep` argument that names a test's grandchild in /proc/*/cmdline."""
    return "30.%d%06d" % (os.getpid() % 100000, random.randrange(10 ** 6))


class QueueTestCase(unittest.TestCase):
    """A temporary directory and database; pools started here are killed at cleanup."""

    def setUp(self):
        if not LINUX:
            self.skipTest("needs Linux /proc")
        self.dir = tempfile.mkdtemp(prefix="queuectl-rel-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.db = os.path.join(self.dir, "q.db")
        self.ledger = os.path.join(self.dir, "ledger.txt")
        # Cleanups run last-in first-out: this one after the pools are killed,
        # before the directory goes. Nothing a test started may outlive it.
        self.addCleanup(lambda: kill_all(pids_of_db(self.db)))

    def start_pool(self, *args, count=1, env=None):
        """`queuectl worker start --count N ARGS` in its own process group; its
        log goes to a file. Killed (the whole group) at cleanup."""
        log = open(os.path.join(self.dir, "pool-%d.log" % time.monotonic_ns()), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, QUEUECTL, "--db", self.db, "worker", "start",
                                 "--count", str(count)] + list(args),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(env),
                                start_new_session=True)
        proc.log_path = log.name

        def cleanup():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(timeout=10)
        self.addCleanup(cleanup)
        return proc

    def pool_log(self, proc):
        with open(proc.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_pool_ready(self, proc, count, timeout=10):
        """Until the pool's workers are registered (and its signal handlers set)."""
        def ready():
            code, out, _ = qc(self.db, "status", "--json")
            return code == 0 and len(json.loads(out)["workers"]) >= count
        wait_until(ready, timeout, "%d workers to register" % count, interval=0.1)

    def ledger_lines(self):
        try:
            with open(self.ledger) as f:
                return f.read().split("\n")[:-1]
        except OSError:
            return []

    def ledger_job(self, body):
        """A command that logs `start <id>` and `end <id>` around `body`."""
        ledger = shlex.quote(self.ledger)
        return 'echo "start $QUEUECTL_JOB_ID" >> %s; %s; echo "end $QUEUECTL_JOB_ID" >> %s' % (
            ledger, body, ledger)

    def enqueue(self, command, *flags):
        return qc_ok(self, self.db, "enqueue", *flags, "--", command).strip()

    def job(self, job_id):
        return db_jobs(self.db)[job_id]


# -- 1. chaos --------------------------------------------------------------------

class ChaosTest(unittest.TestCase):
    """chaos.py's short run: workers and whole pools SIGKILLed while jobs run."""

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


# -- 2. contention ---------------------------------------------------------------

class ContentionTest(QueueTestCase):
    """Many processes enqueueing at once while a pool drains: no lock errors."""

    ENQUEUERS = 14          # processes enqueueing one job at a time ...
    EACH = 6                # ... this many times each
    BATCHES = 2             # plus processes enqueueing a --file batch ...
    BATCH = 60              # ... of this many jobs

    def test_sixteen_enqueuers_while_pool_drains(self):
        pool = self.start_pool(count=4)
        self.wait_pool_ready(pool, 4)
        command = 'echo "$QUEUECTL_JOB_ID" >> %s' % shlex.quote(self.ledger)
        results = []            # (exit code, stdout, stderr) of every queuectl run
        lock = threading.Lock()
        go = threading.Event()

        def one_by_one():
            go.wait()
            for _ in range(self.EACH):
                r = qc(self.db, "enqueue", "--", command)
                with lock:
                    results.append(r)

        def batch():
            data = "".join(json.dumps({"command": command}) + "\n" for _ in range(self.BATCH)).encode()
            go.wait()
            r = qc(self.db, "enqueue", "--file", "-", stdin=data)
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
            jobs = db_jobs(self.db)
            return sum(1 for j in jobs.values() if j["state"] == "completed") == expected
        wait_until(drained, 60, "the pool to run every job", interval=0.2)
        self.assertEqual(set(db_jobs(self.db)), set(ids))
        ran = self.ledger_lines()
        self.assertEqual(sorted(ran), sorted(ids), "a job ran twice or not at all")

        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=20), 0)
        log = self.pool_log(pool)
        self.assertNotIn("locked", log)
        self.assertNotIn("Traceback", log)


class BusyTimeoutTest(QueueTestCase):
    """Another process holds the write lock: queuectl waits, or fails in one line."""

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
        qc_ok(self, self.db, "enqueue", "--id", "first", "--", "true")

    def test_enqueue_waits_for_a_lock_released_in_time(self):
        holder = self.hold_lock(1.5)
        t0 = time.monotonic()
        code, out, err = qc(self.db, "enqueue", "--id", "second", "--", "true",
                            env={"QUEUECTL_BUSY_TIMEOUT": "20"})
        waited = time.monotonic() - t0
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, b"second\n")
        self.assertGreater(waited, 1.0, "enqueue did not wait for the lock")
        self.assertEqual(holder.wait(timeout=10), 0)
        self.assertIn("second", db_jobs(self.db))

    def test_lock_held_past_the_timeout_fails_in_one_line(self):
        before = db_dump(self.db)
        holder = self.hold_lock(3)
        for args in (("enqueue", "--", "true"), ("config", "set", "max_retries", "7"),
                     ("cancel", "first")):
            t0 = time.monotonic()
            code, out, err = qc(self.db, *args, env={"QUEUECTL_BUSY_TIMEOUT": "0.5"})
            with self.subTest(args=args):
                self.assertLess(time.monotonic() - t0, 2.0, "the busy timeout was not applied")
                self.assertEqual(code, 1)
                self.assertEqual(out, b"")
                lines = err.decode().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertRegex(lines[0], r"^queuectl: error: database .* is locked")
        # Reads do not need the write lock (WAL).
        code, out, err = qc(self.db, "list", env={"QUEUECTL_BUSY_TIMEOUT": "0.5"})
        self.assertEqual(code, 0, err)
        self.assertEqual(holder.wait(timeout=10), 0)
        self.assertEqual(db_dump(self.db), before)

    def test_worker_rides_out_a_lock_held_past_its_busy_timeout(self):
        # A heartbeat that cannot get the lock is not a lost lease: the lease
        # has 30 s left. The job must finish once, its result recorded.
        job = qc_ok(self, self.db, "enqueue", "--", self.ledger_job("sleep 3")).strip()
        pool = self.start_pool(count=1, env={"QUEUECTL_BUSY_TIMEOUT": "0.5"})
        wait_until(lambda: self.ledger_lines(), 15, "the job to start")
        # Held across the worker's first heartbeat (HEARTBEAT_SECONDS = 2 s
        # after its start), for longer than its busy timeout.
        holder = self.hold_lock(2.5)
        self.assertEqual(holder.wait(timeout=10), 0)
        wait_until(lambda: db_jobs(self.db)[job]["state"] not in ("pending", "processing"), 20,
                   "the job to finish")
        row = db_jobs(self.db)[job]
        self.assertEqual((row["state"], row["attempts"]), ("completed", 1))
        self.assertEqual(len(self.ledger_lines()), 2, "the job ran more than once")
        self.assertNotIn("died", self.pool_log(pool))


# -- 3. shutdown ----------------------------------------------------------------

class ShutdownTest(QueueTestCase):
    """Graceful and hard stops, systemd's KillMode=mixed, and grandchildren."""

    def starts(self):
        return [line.split()[1] for line in self.ledger_lines() if line.startswith("start ")]

    def ends(self):
        return [line.split()[1] for line in self.ledger_lines() if line.startswith("end ")]

    def test_graceful_stop_finishes_running_jobs(self):
        a = self.enqueue(self.ledger_job("sleep 1.5"))
        b = self.enqueue(self.ledger_job("sleep 1.5"))
        c = self.enqueue(self.ledger_job("true"))
        pool = self.start_pool(count=2)
        wait_until(lambda: len(self.starts()) == 2, 15, "two jobs to start")
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=20), 0)
        jobs = db_jobs(self.db)
        self.assertEqual((jobs[a]["state"], jobs[a]["attempts"]), ("completed", 1))
        self.assertEqual((jobs[b]["state"], jobs[b]["attempts"]), ("completed", 1))
        self.assertEqual((jobs[c]["state"], jobs[c]["attempts"]), ("pending", 0))
        self.assertEqual(sorted(self.ends()), sorted([a, b]))
        self.assertEqual(pids_of_db(self.db), [])

    def test_hard_stop_puts_jobs_back_without_an_attempt(self):
        marker = new_marker()
        job = self.enqueue(self.ledger_job("sleep %s & sleep 30" % marker), "--max-retries", "0")
        pool = self.start_pool(count=1)
        wait_until(lambda: self.starts() and pids_with_marker(marker), 15, "the job to start")
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(pool.pid, signal.SIGTERM)
        t0 = time.monotonic()
        self.assertEqual(pool.wait(timeout=20), 130)
        self.assertLess(time.monotonic() - t0, 5.0, "a hard stop should not wait for the job")
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))
        self.assertEqual([r["outcome"] for r in db_runs(self.db, job)], ["interrupted"])
        wait_until(lambda: not pids_with_marker(marker), 5, "the grandchild to be gone")
        self.assertEqual(self.ends(), [])

    def test_ctrl_c_once_finishes_twice_puts_back(self):
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group
        # (the supervisor and its workers; jobs run in sessions of their own).
        a = self.enqueue(self.ledger_job("sleep 1"))
        pool = self.start_pool(count=1)
        wait_until(lambda: self.starts(), 15, "the job to start")
        os.killpg(pool.pid, signal.SIGINT)
        self.assertEqual(pool.wait(timeout=20), 0)
        self.assertEqual((self.job(a)["state"], self.ends()), ("completed", [a]))

        b = self.enqueue(self.ledger_job("sleep 30"))
        pool = self.start_pool(count=1)
        wait_until(lambda: len(self.starts()) == 2, 15, "the second job to start")
        os.killpg(pool.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(pool.pid, signal.SIGINT)
        self.assertEqual(pool.wait(timeout=20), 130)
        row = self.job(b)
        self.assertEqual((row["state"], row["attempts"]), ("pending", 0))
        self.assertEqual(pids_of_db(self.db), [])

    def test_killmode_mixed_drains(self):
        # systemd, KillMode=mixed: SIGTERM to the main process only; when it
        # has exited (or TimeoutStopSec passed) SIGKILL to whatever is left.
        a = self.enqueue(self.ledger_job("sleep 1"))
        b = self.enqueue(self.ledger_job("sleep 1"))
        c = self.enqueue(self.ledger_job("true"))
        pool = self.start_pool(count=2)
        wait_until(lambda: len(self.starts()) == 2, 15, "two jobs to start")
        os.kill(pool.pid, signal.SIGTERM)
        code = pool.wait(timeout=15)            # TimeoutStopSec
        left = pids_of_group(pool.pid) + pids_of_db(self.db)
        kill_all(left)
        self.assertEqual(code, 0)
        self.assertEqual(left, [], "processes left for the final SIGKILL")
        jobs = db_jobs(self.db)
        self.assertEqual([jobs[i]["state"] for i in (a, b, c)], ["completed", "completed", "pending"])
        self.assertEqual(jobs[c]["attempts"], 0)
        self.assertEqual(sorted(self.ends()), sorted([a, b]))

    def test_killmode_mixed_kills_a_long_job_and_it_runs_again(self):
        # A job longer than TimeoutStopSec dies in the final SIGKILL with its
        # worker; the next worker takes it back and runs it again.
        qc_ok(self, self.db, "config", "set", "backoff_max", "0")
        marker = new_marker()
        job = self.enqueue(self.ledger_job(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then sleep %s & sleep 30; fi' % marker))
        pool = self.start_pool(count=1)
        wait_until(lambda: self.starts() and pids_with_marker(marker), 15, "the job to start")
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(1.0)                         # a short TimeoutStopSec
        self.assertIsNone(pool.poll(), "the pool should still be waiting for its job")
        # The whole cgroup: the pool, its workers, the job and its children.
        kill_all(pids_of_group(pool.pid) + pids_of_db(self.db))
        pool.wait(timeout=10)
        wait_until(lambda: not pids_with_marker(marker), 5, "the cgroup to be empty")
        self.assertEqual(self.job(job)["state"], "processing")
        code, out, err = qc(self.db, "worker", "start", "--once", timeout=60)
        self.assertEqual(code, 0, err)
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("completed", 2))
        self.assertEqual([r["outcome"] for r in db_runs(self.db, job)], ["worker lost", "exit 0"])

    def test_grandchildren_gone_after_a_timeout(self):
        marker = new_marker()
        stubborn = new_marker()
        # One grandchild dies of SIGTERM; one ignores it and must be SIGKILLed.
        job = self.enqueue("sleep %s & (trap '' TERM; exec sleep %s) & sleep 30" % (marker, stubborn),
                           "--timeout", "1", "--max-retries", "0")
        t0 = time.monotonic()
        code, out, err = qc(self.db, "worker", "start", "--once", timeout=60)
        self.assertEqual(code, 0, err)
        self.assertLess(time.monotonic() - t0, 8.0)
        self.assertEqual(pids_with_marker(marker) + pids_with_marker(stubborn), [])
        row = self.job(job)
        self.assertEqual((row["state"], row["outcome"]), ("dead", "timeout"))

    def test_grandchildren_gone_after_a_hard_stop(self):
        marker = new_marker()
        self.enqueue("sleep %s >/dev/null 2>&1 & sleep 30" % marker)
        pool = self.start_pool(count=1)
        wait_until(lambda: pids_with_marker(marker), 15, "the job to start")
        os.kill(pool.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(pool.pid, signal.SIGTERM)
        self.assertEqual(pool.wait(timeout=20), 130)
        wait_until(lambda: not pids_with_marker(marker), 5, "the grandchild to be gone")

    def test_grandchildren_gone_after_pool_sigkill_and_reclaim(self):
        qc_ok(self, self.db, "config", "set", "backoff_max", "0")
        marker = new_marker()
        job = self.enqueue(self.ledger_job(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then sleep %s & sleep 30; fi' % marker))
        pool = self.start_pool(count=2)
        wait_until(lambda: self.starts() and pids_with_marker(marker), 15, "the job to start")
        # The whole pool dies at once; the job's processes (own session) live on.
        os.killpg(pool.pid, signal.SIGKILL)
        pool.wait(timeout=10)
        time.sleep(0.2)
        self.assertTrue(pids_with_marker(marker), "the job's grandchild should have survived")
        self.assertEqual(self.job(job)["state"], "processing")
        # A new worker finds the lease holder dead, kills what is left of the
        # job on this host, and runs the job again.
        code, out, err = qc(self.db, "worker", "start", "--once", timeout=60)
        self.assertEqual(code, 0, err)
        wait_until(lambda: not pids_with_marker(marker), 5, "the orphaned grandchild to be killed")
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("completed", 2))
        self.assertEqual([r["outcome"] for r in db_runs(self.db, job)], ["worker lost", "exit 0"])
        self.assertEqual(pids_of_db(self.db), [])

    def test_job_of_a_killed_worker_not_yet_reaped_is_reclaimed_at_once(self):
        # A worker died but its parent has not reaped it yet (the supervisor
        # is busy, or init is slow): the zombie is dead, its job is free.
        qc_ok(self, self.db, "config", "set", "backoff_max", "0")
        marker = new_marker()
        job = self.enqueue(self.ledger_job(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then sleep %s & sleep 30; fi' % marker))
        pool = self.start_pool(count=1)
        wait_until(lambda: self.starts() and pids_with_marker(marker), 15, "the job to start")
        worker = children(pool.pid)
        self.assertEqual(len(worker), 1)
        os.kill(pool.pid, signal.SIGSTOP)      # cleanup's SIGKILL works on it stopped
        os.kill(worker[0], signal.SIGKILL)
        wait_until(lambda: is_zombie(worker[0]), 5, "the worker to be a zombie")
        code, out, err = qc(self.db, "worker", "start", "--once", timeout=60)
        self.assertEqual(code, 0, err)
        row = self.job(job)
        self.assertEqual((row["state"], row["attempts"]), ("completed", 2))
        wait_until(lambda: not pids_with_marker(marker), 5, "the orphaned grandchild to be killed")

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
        marker = new_marker()
        job = self.enqueue("setsid sleep %s >/dev/null 2>&1 & sleep 30" % marker,
                           "--timeout", "1", "--max-retries", "0")
        code, out, err = qc(self.db, "worker", "start", "--once", timeout=60)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.job(job)["outcome"], "timeout")
        wait_until(lambda: not pids_with_marker(marker), 3, "the daemonized grandchild to be gone")


# -- 4. bad input ---------------------------------------------------------------

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


def _mount_tmpfs(test, size="256k"):
    """A small tmpfs of our own (root only); unmounted at cleanup."""
    if os.geteuid() != 0:
        test.skipTest("mounting a tmpfs needs root")
    mnt = os.path.join(test.dir, "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        test.skipTest("cannot mount a tmpfs here: %s" % r.stdout.decode(errors="replace").strip())
    test.addCleanup(subprocess.run, ["umount", "-l", mnt])
    return mnt


class BadInputTest(QueueTestCase):
    """Each bad input: exit non-zero, one line on stderr naming the problem, no
    traceback, nothing on stdout, and the database unchanged (or not created)."""

    @classmethod
    def setUpClass(cls):
        # One seeded database, copied for each case (seeding takes a worker run).
        cls._template_dir = tempfile.mkdtemp(prefix="queuectl-rel-template-")
        cls._template = os.path.join(cls._template_dir, "q.db")
        db = cls._template

        def ok(*args):
            code, out, err = qc(db, *args)
            assert code == 0, err
        ok("enqueue", "--id", "seed-done", "--", "true")
        ok("enqueue", "--id", "seed-dead", "--max-retries", "0", "--", "exit 3")
        ok("worker", "start", "--once")
        ok("enqueue", "--id", "seed-pending", "--priority", "5", "--", "echo later")
        ok("config", "set", "max_retries", "5")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls._template_dir, True)

    def seed(self, db):
        """A queuectl database with a completed, a dead and a pending job."""
        for suffix in ("", "-wal"):
            if os.path.exists(self._template + suffix):
                shutil.copyfile(self._template + suffix, db + suffix)

    def setup_db(self, kind):
        """Prepare the database of a case; returns (path, state function)."""
        db = self.db
        dump = lambda: db_dump(db)
        if kind == "seeded":
            self.seed(db)
        elif kind == "absent":
            db = os.path.join(self.dir, "sub", "q.db")
            dump = lambda: (os.path.exists(db), os.path.exists(os.path.dirname(db)))
        elif kind == "directory":
            db = self.dir
            dump = lambda: sorted(os.listdir(self.dir))
        elif kind == "under_file":
            db = os.path.join(self.dir, "afile", "q.db")
            with open(os.path.join(self.dir, "afile"), "w") as f:
                f.write("not a directory\n")
            dump = lambda: sorted(os.listdir(self.dir))
        elif kind == "uncreatable":
            db = "/proc/queuectl-test-%d/q.db" % os.getpid()
            dump = lambda: os.path.exists(os.path.dirname(db))
        elif kind == "read_only_dir":
            if os.geteuid() == 0:
                self.skipTest("root ignores directory permissions (see db_on_read_only_fs)")
            ro = os.path.join(self.dir, "ro")
            os.mkdir(ro, 0o500)
            self.addCleanup(os.chmod, ro, 0o700)
            db = os.path.join(ro, "q.db")
            dump = lambda: sorted(os.listdir(ro))
        elif kind == "read_only_fs":
            mnt = _mount_tmpfs(self)
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
            mnt = _mount_tmpfs(self)
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
            dump = (lambda: db_dump(db)) if kind == "full_disk" else (lambda: file_state(db)[:2])
        return db, dump

    def check_case(self, name, argv, data, words, kind):
        db, state = self.setup_db(kind)
        env = {"QUEUECTL_BUSY_TIMEOUT": "abc"} if name == "bad_busy_timeout_variable" else None
        stdin = data
        if "{file}" in argv:
            path = os.path.join(self.dir, "input")
            with open(path, "wb") as f:
                f.write(data)
            argv = [path if a == "{file}" else a for a in argv]
            stdin = None
        before = state()
        code, out, err = qc(db, *argv, stdin=stdin, env=env)
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


class NonUtf8ArgumentTest(QueueTestCase):
    """A command-line argument that is not UTF-8 (Python sees surrogates)."""

    def test_non_utf8_command_argument(self):
        qc_ok(self, self.db, "enqueue", "--id", "x", "--", "true")
        before = db_dump(self.db)
        code, out, err = qc(self.db, "enqueue", "--", os.fsdecode(b"echo caf\xe9"))
        text = err.decode("utf-8", "replace")
        self.assertNotIn("Traceback", text)
        if code == 0:
            # Accepted: then it must run exactly those bytes.
            self.assertEqual(len(out.split()), 1)
        else:
            self.assertEqual(len(text.splitlines()), 1, text)
            self.assertEqual(db_dump(self.db), before)

    def test_non_utf8_job_id_argument(self):
        qc_ok(self, self.db, "enqueue", "--id", "x", "--", "true")
        before = db_dump(self.db)
        for args in (["show", os.fsdecode(b"\xff")], ["cancel", os.fsdecode(b"\xff")],
                     ["enqueue", "--id", os.fsdecode(b"\xff"), "--", "true"]):
            code, out, err = qc(self.db, *args)
            text = err.decode("utf-8", "replace")
            with self.subTest(args=args):
                self.assertNotIn("Traceback", text)
                self.assertEqual(code, 1)
                self.assertEqual(len(text.splitlines()), 1, text)
        self.assertEqual(db_dump(self.db), before)


if __name__ == "__main__":
    unittest.main()
