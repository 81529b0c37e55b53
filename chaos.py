#!/usr/bin/env python3
"""chaos.py: kill queuectl workers at random and prove that no job is lost.

    $ python3 chaos.py                         # ~500 jobs, ~120 s of chaos
    $ python3 chaos.py --jobs 60 --seconds 8   # the short run of the test suite
    $ python3 chaos.py --db postgresql://user@host/db   # the same on PostgreSQL

Jobs are shell commands that append ``start <id> <shell pid> <worker pid>``
and ``end <id> <shell pid>`` to a ledger file and take 0-300 ms; some leave a
grandchild behind (``sleep 30.<marker> &``). They are enqueued in batches
while a pool of workers (``queuectl worker start --count 4``) drains them.
Jobs go to four queues: "default", "one" (limit 1), "two" (limit 2) and
"wide" (no limit); about one job in five runs --after an earlier job.
Meanwhile a random worker process of the pool gets SIGKILL about every second
and the whole pool (supervisor and workers, not the jobs' processes) about
every 20 s, and is started again. At the end a fresh pool drains the queue
and the run is checked:

- every job completed: none lost, none dead, none stuck in processing;
- a job ran more than once only if each earlier run was taken back as
  "worker lost" from a worker that this script SIGKILLed while that run was in
  flight (between its claim and the reclaim); and every run taken back was
  such a run (no live worker lost a job, no job was killed under one);
- no process of a job is left (found by QUEUECTL_DB=<this database> in its
  environment, or by the marker in its command line);
- ``PRAGMA integrity_check`` is ok (SQLite); no enqueue failed; no worker log
  line contains a traceback or "database is locked";
- the limits held: no two runs of a job of "one", and no three of "two",
  overlap in time (a run lasts from its claim to its result or its reclaim);
- every job with dependencies started after each of them completed.

With --db URL the queue lives on PostgreSQL instead of in a SQLite file: in a
new schema of that database (dropped at the end unless a check failed or
--keep), reached through the URL's options=-csearch_path=...

Prints the figures, writes them as JSON with --json, exits 0 only if every
check passed. Standard library only (with --db: psycopg or psycopg2); Linux
(it reads /proc).
"""

import argparse
import json
import os
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUECTL = os.path.join(HERE, "queuectl.py")

#: Jobs of a chaos run may be retried this often: a job killed many times must
#: not go to the DLQ, so that "not completed" really means lost.
MAX_RETRIES = 20
#: Queues of a chaos run and their limits (None: no limit).
QUEUES = {"default": None, "one": 1, "two": 2, "wide": None}


# -- /proc helpers ---------------------------------------------------------------

def _pids():
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _stat(pid):
    """(state, ppid, pgrp, session) of a process, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return b"\0" + f.read()
    except OSError:
        return b""


def session_members(sid):
    """Live (non-zombie) processes of a session. A pool is started in a session
    of its own: its supervisor and its workers (each worker in a process
    group of its own); its jobs have sessions of their own."""
    out = []
    for pid in _pids():
        st = _stat(pid)
        if st and st[3] == sid and st[0] != "Z":
            out.append(pid)
    return out


def signal_session(sid, sig):
    """`sig` to a session's leader first, then to its other members; returns them."""
    _kill(sid, sig)
    members = session_members(sid)
    for pid in members:
        _kill(pid, sig)
    return members


def pool_workers(pool_pid):
    """The worker processes of a pool: its session minus the supervisor
    and multiprocessing's helpers (forkserver, resource tracker)."""
    out = []
    for pid in session_members(pool_pid):
        if pid == pool_pid:
            continue
        cmd = _cmdline(pid)
        if "forkserver" in cmd or "resource_tracker" in cmd:
            continue
        out.append(pid)
    return out


def job_processes(db_path, marker):
    """Processes left by this run's jobs: QUEUECTL_DB=<db> in their environment,
    or CHAOS_RUN=<marker> (which the pools pass on) with a QUEUECTL_JOB_ID, or
    the run's marker in their command line."""
    mark = b"\0QUEUECTL_DB=" + os.path.abspath(db_path).encode() + b"\0"
    run_mark = b"\0CHAOS_RUN=" + marker.encode() + b"\0"
    me = os.getpid()
    out = []
    for pid in _pids():
        if pid == me:
            continue
        st = _stat(pid)
        if st is None or st[0] == "Z":
            continue
        env = _environ(pid)
        if mark in env or run_mark in env and b"\0QUEUECTL_JOB_ID=" in env or marker in _cmdline(pid):
            out.append((pid, _cmdline(pid)))
    return out


def is_postgres_url(db):
    return db.startswith(("postgresql://", "postgres://"))


def with_search_path(url, schema):
    """`url` with options=-csearch_path=SCHEMA added (one queue per schema)."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query) + [("options", "-csearch_path=%s" % schema)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def pg_connect(url):
    """An autocommit connection with psycopg 3, or psycopg2."""
    try:
        import psycopg
        return psycopg.connect(url, autocommit=True)
    except ImportError:
        import psycopg2
        conn = psycopg2.connect(url)
        conn.autocommit = True
        return conn


def _kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
        return True
    except OSError:
        return False


# -- the run ---------------------------------------------------------------------

class Chaos:
    def __init__(self, args, out=sys.stdout):
        self.args = args
        self.out = out
        self.rng = random.Random(args.seed)
        self.workdir = args.dir or tempfile.mkdtemp(prefix="queuectl-chaos-")
        os.makedirs(self.workdir, exist_ok=True)
        self.ledger = os.path.join(self.workdir, "ledger.txt")
        # A marker unique to this run: in job ids and grandchildren's argv.
        self.tag = "%06d" % self.rng.randrange(10 ** 6)
        self.marker = "30.%s" % self.tag
        self.pg = args.db is not None
        if self.pg:
            self.schema = "queuectl_chaos_%s_%d" % (self.tag, os.getpid())
            self.db = with_search_path(args.db, self.schema)
        else:
            self.db = os.path.abspath(os.path.join(self.workdir, "chaos.db"))
        self.pool = None
        self.pool_logs = []
        self.kills = {}                 # pid of a worker we SIGKILLed -> [time.time() of each kill]
        self.worker_kills = 0
        self.pool_kills = 0
        self.enqueue_errors = []
        self.enqueued = 0
        self.jobs = self._make_jobs()
        self.batches, i = [], 0
        while i < len(self.jobs):
            size = self.rng.randint(1, 25)
            self.batches.append(self.jobs[i:i + size])
            i += size

    def say(self, message):
        if not self.args.quiet:
            self.out.write("chaos: %s\n" % message)
            self.out.flush()

    def _make_jobs(self):
        jobs = []
        ledger = shlex.quote(self.ledger)
        for n in range(self.args.jobs):
            job_id = "c%s-%04d" % (self.tag, n)
            # The worker's pid comes from QUEUECTL_WORKER_ID (host:pid:start),
            # not $PPID, which is 1 if the worker died before the shell
            # started; the attempt number names the run (attempts only go up
            # here: nothing gives one back but a hard stop).
            parts = ['w=${QUEUECTL_WORKER_ID%%:*}; echo "start $QUEUECTL_JOB_ID $$ ${w##*:} $QUEUECTL_ATTEMPT" >> %s'
                     % ledger]
            kind = self.rng.random()
            if kind < 0.15:
                # A grandchild that keeps the job's stdout/stderr open.
                parts.append("sleep %s%04d &" % (self.marker, n))
            elif kind < 0.30:
                parts.append("sleep %s%04d >/dev/null 2>&1 &" % (self.marker, n))
            parts.append("sleep 0.%03d" % self.rng.randrange(300))
            parts.append('echo "end $QUEUECTL_JOB_ID $$" >> %s' % ledger)
            # "a & b" runs a in the background ("a &; b" is a syntax error).
            command = "; ".join(parts).replace("&;", "&")
            job = {"id": job_id, "command": command, "max_retries": MAX_RETRIES,
                   "queue": self.rng.choice(sorted(QUEUES))}
            if jobs and self.rng.random() < 0.2:
                # Enqueued before this one (same or an earlier batch).
                job["after"] = sorted({self.rng.choice(jobs)["id"] for _ in range(self.rng.randint(1, 2))})
            jobs.append(job)
        return jobs

    # -- queuectl ----------------------------------------------------------------

    def queuectl(self, *argv, stdin=None, timeout=60):
        return subprocess.run([sys.executable, QUEUECTL, "--db", self.db] + list(argv),
                              input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)

    def setup(self):
        if self.pg:
            self.say("queue in schema %s" % self.schema)
            self.sql_rows("CREATE SCHEMA %s" % self.schema)
        for argv in (("config", "set", "max_retries", str(MAX_RETRIES)),
                     # Retry at once: a reclaimed job is claimable again at
                     # once, which is the hardest case for the reclaimer.
                     ("config", "set", "backoff_max", "0")) + tuple(
                        ("queue", "set", name, "--limit", str(limit)) for name, limit in QUEUES.items() if limit):
            r = self.queuectl(*argv)
            if r.returncode != 0:
                raise RuntimeError("queuectl %s failed: %s" % (" ".join(argv), r.stderr.decode()))

    def feed(self, until):
        """Enqueue the jobs in random batches, spread evenly until `until`."""
        start = time.monotonic()
        step = max(until - start, 0) / max(len(self.batches), 1)
        for k, batch in enumerate(self.batches):
            delay = start + k * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            data = "".join(json.dumps(j) + "\n" for j in batch).encode()
            try:
                r = self.queuectl("enqueue", "--file", "-", stdin=data)
            except subprocess.TimeoutExpired:
                self.enqueue_errors.append("enqueue timed out")
                continue
            err = r.stderr.decode("utf-8", "replace")
            if r.returncode != 0 or err.strip():
                self.enqueue_errors.append("exit %d: %s" % (r.returncode, err.strip()[:300]))
            else:
                self.enqueued += len(r.stdout.split())

    # -- the pool ----------------------------------------------------------------

    def start_pool(self):
        log = os.path.join(self.workdir, "pool-%02d.log" % len(self.pool_logs))
        self.pool_logs.append(log)
        env = dict(os.environ)
        env.pop("QUEUECTL_DB", None)
        env["CHAOS_RUN"] = self.marker
        with open(log, "wb") as f:
            # Its own session: the pool (supervisor and workers) can be found and killed as one;
            # the jobs' processes have sessions of their own and survive it.
            self.pool = subprocess.Popen(
                [sys.executable, QUEUECTL, "--db", self.db, "worker", "start",
                 "--count", str(self.args.workers)],
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, start_new_session=True)

    def kill_worker(self):
        """SIGKILL one random worker process of the pool."""
        workers = pool_workers(self.pool.pid)
        if not workers:
            return
        pid = self.rng.choice(workers)
        now = time.time()
        if _kill(pid):
            self.kills.setdefault(pid, []).append(now)
            self.worker_kills += 1

    def kill_pool(self):
        """SIGKILL the supervisor and its workers at once (not the jobs)."""
        # Freeze the pool first (its supervisor first) so that no worker is
        # started between the count and the kill.
        members = signal_session(self.pool.pid, signal.SIGSTOP)
        now = time.time()
        signal_session(self.pool.pid, signal.SIGKILL)
        for pid in members:
            self.kills.setdefault(pid, []).append(now)
        self.pool_kills += 1
        self.pool.wait(timeout=10)
        self.pool = None

    def stop_pool(self, timeout=15.0):
        """SIGTERM (graceful), then SIGKILL of the pool if it does not stop."""
        if self.pool is None:
            return None
        _kill(self.pool.pid, signal.SIGTERM)
        try:
            code = self.pool.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        signal_session(self.pool.pid, signal.SIGKILL)
        if code is None:
            self.pool.wait(timeout=10)
        self.pool = None
        return code

    # -- database ----------------------------------------------------------------

    def sql_rows(self, sql):
        """Rows of one statement as dicts (times as epoch seconds), read directly: from the
        SQLite file read-only, or on PostgreSQL in this run's schema."""
        if self.pg:
            conn = pg_connect(self.db)
        else:
            conn = sqlite3.connect("file:%s?mode=ro" % self.db, uri=True, timeout=30)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            if cur.description is None:
                return []
            names = [d[0] for d in cur.description]
            return [{k: v.timestamp() if hasattr(v, "timestamp") else v for k, v in zip(names, row)}
                    for row in cur.fetchall()]
        finally:
            conn.close()

    def drop_schema(self):
        if self.pg:
            conn = pg_connect(self.args.db)
            try:
                conn.cursor().execute("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
            finally:
                conn.close()

    def db_rows(self):
        return {r["id"]: (r["state"], r["run_count"]) for r in self.sql_rows("SELECT id, state, run_count FROM jobs")}

    def undrained(self):
        rows = self.db_rows()
        return sum(1 for j in self.jobs if rows.get(j["id"], ("missing",))[0]
                   in ("pending", "failed", "processing"))

    # -- main --------------------------------------------------------------------

    def run(self):
        args = self.args
        t0 = time.monotonic()
        self.say("%d jobs, %gs of chaos, %d workers, seed %s, in %s"
                 % (args.jobs, args.seconds, args.workers, args.seed, self.workdir))
        self.setup()
        chaos_end = t0 + args.seconds
        feeder = threading.Thread(target=self.feed, args=(t0 + 0.6 * args.seconds,), daemon=True)
        try:
            self.start_pool()
            feeder.start()
            pool_every = args.pool_kill_every
            next_worker_kill = time.monotonic() + self.rng.uniform(0.5, 1.5)
            next_pool_kill = time.monotonic() + pool_every * self.rng.uniform(0.8, 1.2)
            while time.monotonic() < chaos_end:
                now = time.monotonic()
                if now >= next_pool_kill:
                    self.kill_pool()
                    time.sleep(self.rng.uniform(0.0, 0.3))
                    self.start_pool()
                    next_pool_kill = now + pool_every * self.rng.uniform(0.8, 1.2)
                elif now >= next_worker_kill:
                    self.kill_worker()
                    next_worker_kill = now + self.rng.uniform(0.5, 1.5)
                time.sleep(max(0.0, min(next_worker_kill, next_pool_kill, chaos_end)
                               - time.monotonic()))
            # The end of the chaos: the last pool dies too; a fresh one drains.
            self.kill_pool()
            feeder.join(timeout=60)
            self.say("chaos over after %.1fs: %d worker kills, %d pool kills; draining"
                     % (time.monotonic() - t0, self.worker_kills, self.pool_kills))
            self.start_pool()
            drain_deadline = time.monotonic() + args.drain_timeout
            # Let the pool come up (and install its signal handlers) before
            # anything else: a SIGTERM before then would kill it outright.
            while len(pool_workers(self.pool.pid)) < args.workers and time.monotonic() < drain_deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            left = self.undrained()
            while left and time.monotonic() < drain_deadline:
                time.sleep(0.2)
                left = self.undrained()
            stop_code = self.stop_pool()
            # Give the kernel a moment to finish killing what queuectl killed.
            end = time.monotonic() + 2.0
            orphans = job_processes(self.db, self.marker)
            while orphans and time.monotonic() < end:
                time.sleep(0.1)
                orphans = job_processes(self.db, self.marker)
            return self.check(left, orphans, stop_code, time.monotonic() - t0)
        finally:
            if self.pool is not None:
                signal_session(self.pool.pid, signal.SIGKILL)
                self.pool.wait()
            for pid, _ in job_processes(self.db, self.marker):
                _kill(pid)

    def db_runs(self):
        """{(job id, attempt): run row} from the runs table."""
        return {(r["job_id"], r["attempt"]): r for r in self.sql_rows(
            "SELECT job_id, run, attempt, worker_id, started_at, finished_at, outcome FROM runs")}

    def lost_to_a_kill(self, run, worker_pid):
        """Was `run` (a runs row) reclaimed from a worker we killed while it ran?"""
        if run is None or run["outcome"] != "worker lost":
            return False
        pid = int(run["worker_id"].rsplit(":", 2)[1])
        if worker_pid is not None and pid != worker_pid:
            return False
        end = run["finished_at"] if run["finished_at"] is not None else float("inf")
        return any(run["started_at"] <= t <= end for t in self.kills.get(pid, ()))

    def check_queues(self, db_runs):
        """Runs that overlapped more than their queue's limit; jobs that
        started before a dependency completed."""
        queue = {j["id"]: j["queue"] for j in self.jobs}
        over = []
        for name, limit in QUEUES.items():
            if not limit:
                continue
            events = []
            for r in db_runs.values():
                if queue.get(r["job_id"]) == name:
                    events.append((r["started_at"], 1, r["job_id"]))
                    events.append((r["finished_at"] if r["finished_at"] is not None else float("inf"), -1,
                                   r["job_id"]))
            running = 0
            for t, step, job_id in sorted(events, key=lambda e: (e[0], e[1])):     # ends first at a tie
                running += step
                if running > limit:
                    over.append("%s: %d running at %.6f (%s)" % (name, running, t, job_id))
        first_start, completed_at = {}, {}
        for r in db_runs.values():
            first_start[r["job_id"]] = min(first_start.get(r["job_id"], float("inf")), r["started_at"])
            if r["outcome"] == "exit 0":
                completed_at[r["job_id"]] = r["finished_at"]
        early = ["%s after %s" % (j["id"], a) for j in self.jobs for a in j.get("after", ())
                 if j["id"] in first_start and first_start[j["id"]] < completed_at.get(a, float("inf"))]
        return over, early

    def read_ledger(self):
        starts, ends = {}, {}
        try:
            with open(self.ledger) as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split()
            if len(parts) == 5 and parts[0] == "start":
                starts.setdefault(parts[1], []).append((int(parts[2]), int(parts[3]), int(parts[4])))
            elif len(parts) == 3 and parts[0] == "end":
                ends.setdefault(parts[1], set()).add(int(parts[2]))
        return starts, ends

    def check(self, undrained, orphans, stop_code, elapsed):
        rows = self.db_rows()
        ids = [j["id"] for j in self.jobs]
        states = {i: rows.get(i, ("missing", 0))[0] for i in ids}
        count = lambda s: sum(1 for v in states.values() if v == s)
        starts, ends = self.read_ledger()
        db_runs = self.db_runs()

        histogram = {}
        duplicates, explained, no_end, unexplained = 0, 0, 0, []
        never_ran, completed_without_end, ledger_over_db = [], [], []
        for job_id in ids:
            runs = starts.get(job_id, [])
            histogram[len(runs)] = histogram.get(len(runs), 0) + 1
            if states[job_id] == "completed":
                if not runs:
                    never_ran.append(job_id)
                elif runs[-1][0] not in ends.get(job_id, ()):
                    completed_without_end.append(job_id)
            if len(runs) > rows.get(job_id, (None, 0))[1]:
                ledger_over_db.append(job_id)
            if len(runs) > 1:
                # Explained: every earlier run was taken back as 'worker lost',
                # and its worker is one we SIGKILLed while that run was in flight
                # (between its claim and the reclaim).
                duplicates += 1
                if all(self.lost_to_a_kill(db_runs.get((job_id, attempt)), worker)
                       for _, worker, attempt in runs[:-1]):
                    explained += 1
                    if runs[0][0] not in ends.get(job_id, ()):
                        no_end += 1
                else:
                    unexplained.append(job_id)

        # Every run queuectl took back must be one we killed, and no live
        # worker may have lost its lease or had its job killed under it.
        spurious = ["%s run %d: %s" % (r["job_id"], r["run"], r["outcome"]) for r in db_runs.values()
                    if r["outcome"] == "worker lost" and not self.lost_to_a_kill(r, None)
                    or r["outcome"] in ("lease lost", "interrupted")
                    or (r["outcome"] or "").startswith("killed by")]
        worker_lost = sum(1 for r in db_runs.values() if r["outcome"] == "worker lost")

        problems = []
        for log in self.pool_logs:
            try:
                with open(log, "rb") as f:
                    for line in f.read().decode("utf-8", "replace").splitlines():
                        if "Traceback" in line or "locked" in line:
                            problems.append("%s: %s" % (os.path.basename(log), line.strip()[:200]))
            except OSError:
                pass
        if self.pg:
            integrity = "not applicable (PostgreSQL)"
        else:
            conn = sqlite3.connect(self.db, timeout=30)
            try:
                integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                conn.close()
        over_limit, early = self.check_queues(db_runs)

        lost = [i for i in ids if states[i] != "completed"]
        figures = {
            "jobs": len(ids),
            "enqueued": self.enqueued,
            "completed": count("completed"),
            "dead": count("dead"),
            "lost": len(lost),
            "missing": count("missing"),
            "stuck_processing": count("processing"),
            "not_drained": undrained,
            "runs_per_job": {str(k): v for k, v in sorted(histogram.items())},
            "duplicates": duplicates,
            "duplicates_explained": explained,
            "duplicates_first_run_without_end": no_end,
            "duplicates_unexplained": unexplained,
            "runs_taken_back": worker_lost,
            "runs_lost_without_a_kill": spurious,
            "worker_kills": self.worker_kills,
            "pool_kills": self.pool_kills,
            "orphans": ["%d %s" % o for o in orphans],
            "integrity_check": integrity,
            "enqueue_errors": self.enqueue_errors,
            "log_problems": problems[:20],
            "completed_but_never_ran": never_ran,
            "completed_but_last_run_unfinished": completed_without_end,
            "ledger_runs_above_db_runs": ledger_over_db,
            "final_pool_exit": stop_code,
            "runs_over_a_queue_limit": over_limit[:20],
            "started_before_a_dependency_completed": early[:20],
            "seconds": round(elapsed, 1),
            "seed": self.args.seed,
            "workdir": self.workdir,
            "schema": self.schema if self.pg else None,
        }
        checks = {
            "all jobs completed (none lost)": not lost,
            "none dead": figures["dead"] == 0,
            "none stuck in processing": figures["stuck_processing"] == 0,
            "every duplicate run explained by a kill": not unexplained,
            "every run taken back was on a worker killed during it": not spurious,
            "no orphaned job processes": not orphans,
            "integrity_check ok": integrity == "ok",
            "every enqueue succeeded": not self.enqueue_errors and self.enqueued == len(ids),
            "no traceback or 'locked' in worker logs": not problems,
            "every completed job ran to its end": not never_ran and not completed_without_end,
            "ledger runs <= recorded runs": not ledger_over_db,
            "final pool stopped cleanly (exit 0)": stop_code == 0,
            "queue limits held": not over_limit,
            "no job started before its dependencies completed": not early,
        }
        if self.pg:
            del checks["integrity_check ok"]      # no such check on PostgreSQL
        figures["checks"] = checks
        figures["passed"] = all(checks.values())
        self.report(figures)
        return figures

    def report(self, f):
        w = self.out.write
        w("jobs        %d (enqueued %d)\n" % (f["jobs"], f["enqueued"]))
        w("completed   %d\n" % f["completed"])
        w("dead        %d\n" % f["dead"])
        w("lost        %d (missing %d)\n" % (f["lost"], f["missing"]))
        w("processing  %d (stuck)\n" % f["stuck_processing"])
        w("kills       %d workers, %d whole pools\n" % (f["worker_kills"], f["pool_kills"]))
        w("runs/job    %s\n" % ", ".join("%s run%s: %d" % (k, "" if k == "1" else "s", v)
                                        for k, v in f["runs_per_job"].items()))
        w("duplicates  %d, explained by a kill %d (first run without end %d), unexplained %d%s\n" % (
            f["duplicates"], f["duplicates_explained"], f["duplicates_first_run_without_end"],
            len(f["duplicates_unexplained"]),
            (": " + " ".join(f["duplicates_unexplained"][:10])) if f["duplicates_unexplained"] else ""))
        w("taken back  %d runs ('worker lost'), %d not explained by a kill%s\n" % (
            f["runs_taken_back"], len(f["runs_lost_without_a_kill"]),
            "".join("\n  " + r for r in f["runs_lost_without_a_kill"][:10])))
        w("orphans     %d%s\n" % (len(f["orphans"]), "".join("\n  " + o for o in f["orphans"][:10])))
        w("integrity   %s\n" % f["integrity_check"])
        for e in f["enqueue_errors"][:5]:
            w("enqueue error: %s\n" % e)
        for p in f["log_problems"][:5]:
            w("log: %s\n" % p)
        w("time        %.1fs\n" % f["seconds"])
        for name, ok in f["checks"].items():
            w("%s %s\n" % ("PASS" if ok else "FAIL", name))
        w("%s\n" % ("chaos: all checks passed" if f["passed"] else "chaos: FAILED (files kept in %s%s)"
                    % (f["workdir"], ", the queue in schema " + f["schema"] if f["schema"] else "")))
        self.out.flush()


def build_parser():
    p = argparse.ArgumentParser(prog="chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=500, help="number of jobs (default 500)")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the chaos (default 120)")
    p.add_argument("--workers", type=int, default=4, help="workers per pool (default 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--pool-kill-every", type=float, default=None, metavar="S",
                   help="kill the whole pool about every S seconds (default: 20, or a third of "
                        "--seconds if that is shorter)")
    p.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                   help="how long the final pool may take to drain (default: 20 + jobs/10)")
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--db", metavar="URL", help="a postgresql:// URL: the queue goes into a new schema of that "
                                               "database (default: a SQLite file in the work directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even if all passed")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None, out=sys.stdout):
    """Run the chaos test; returns 0 if every check passed, else 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.db is not None and not is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL (a SQLite run uses a file in the work directory)")
    if args.seed is None:
        args.seed = random.randrange(10 ** 9)
    if args.pool_kill_every is None:
        args.pool_kill_every = min(20.0, max(args.seconds / 3.0, 1.0))
    if args.drain_timeout is None:
        args.drain_timeout = 20.0 + args.jobs / 10.0
    chaos = Chaos(args, out=out)
    figures = chaos.run()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    if figures["passed"] and not args.keep:
        chaos.drop_schema()
        if not args.dir:
            import shutil
            shutil.rmtree(chaos.workdir, ignore_errors=True)
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
