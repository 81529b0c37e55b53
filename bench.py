#!/usr/bin/env python3
"""bench.py: measure queuectl against this machine's limits and its peers.

Runs, side by side in one process and one run (issue 4):

* the limit: a minimal loop in this same Python that starts `sh -c true`
  with its output captured (1 and 2 processes), and a minimal
  claim -> run -> complete loop on SQLite (WAL, synchronous=NORMAL);
* drain: N `true` jobs through `queuectl worker start --once --count 1/2/4`,
  and `sleep 0.05` jobs with 4 workers (parallel efficiency), queuectl run as
  installed (bytecode compiled once; with --baseline, that one too);
* enqueue: one CLI call (median) next to `python3 -c 'import sqlite3'`,
  and a bulk JSON Lines file through `enqueue --file`;
* pickup latency: enqueue -> the job's first instruction, with an idle
  worker already running (p50/p95), and that worker's CPU use while idle
  (the worker as installed);
* scale: claim cost and `status` / `list --limit 20` with 1,000 and with
  1,000,000 jobs stored (most completed, some pending); and draining 300
  due jobs beside 1,000 and beside 1,000,000 jobs that wait at a higher
  priority (scheduled for tomorrow; failed, in a one-hour backoff), issue 13;
* memory: a worker's peak RSS idle and while a job prints 100 MB (installed;
  idle also as `python3 queuectl.py`);
* task-spooler (`tsp`), when installed, on the same drain workload;
* dashboard: every page and API call of `queuectl dashboard` with
  1,000,000 jobs stored (2% of them dead), its CPU use with a page open
  (listening for changes, re-fetching what changed) on an idle queue, and
  a drain of `true` jobs with and without an open page;
* PostgreSQL, with --pg URL (issue 7): the 2- and 4-worker drains on that
  server in the same rounds as SQLite's (for a ratio), pickup latency and
  idle CPU, claim cost with 1,000 and 1,000,000 jobs stored, and `status`
  at 1,000,000. Each queue is a schema of its own in that database
  (options=-csearch_path=...), dropped at the end; bench.py then needs a
  Python with psycopg (or psycopg2).

It then checks the targets of the issue, each a ratio or a bound taken from
this same run, and prints PASS/FAIL for each.

Reading the table: jobs/s is jobs over wall time from the command's start to
its exit (the limit loops: first job to last). "CPU ms/job" is the CPU time
of everything the measurement started, per job: on a machine busy with
other work it is steadier than wall time. The throughput measurements
(limit, drain, sleep, tsp) run in rounds, each once per round, and the best
run counts, so that load from elsewhere hits the queue and its references
alike. For a drain, "start" is the time from the command's start to its
first job, "run" the mean time from claim to recorded result, "gap" the
mean time from a result to the same worker's next claim, "exit" from the
last result to the command's exit. enqueue is timed as installed by copying
(README's recipe: sh execs Python on the cached bytecode), as installed by
pip (its console-script wrapper over cached bytecode) and as `python3
queuectl.py` (which compiles the whole file on every run); the -S rows leave out the
site-packages .pth hooks some machines run at every Python start-up.

    python3 bench.py                    # full run, a few minutes
    python3 bench.py --quick            # tiny sizes (under ~20 s), for the tests
    python3 bench.py --only drain,limit --repeat 3
    python3 bench.py --json out.json    # default: bench-results.json
    python3 bench.py --pg postgresql://postgres@127.0.0.1/bench   # and PostgreSQL beside SQLite

Standard library only. Everything runs in temporary directories that are
removed at exit; every child process is started in its own session and
killed (by its process group) at exit, on error or on timeout. The
1,000,000-job database is cached in $QUEUECTL_BENCH_CACHE (default
/tmp/queuectl-bench-cache) and rebuilt when queuectl's SCHEMA changes.

Exit status: 0 when every section ran (targets may still fail; add
--strict to exit 1 on a failed target), 1 when a section broke.
"""

import argparse
import atexit
import hashlib
import importlib.util
import json
import os
import platform
import py_compile
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SECTIONS = ("limit", "drain", "sleep", "enqueue", "bulk", "pickup", "scale", "tsp", "dashboard", "postgres")
BUILDER_VERSION = "2"   # bump when build_db() changes what it writes


class BenchError(Exception):
    pass


###############################################################################
# Sizes ########################################################################
###############################################################################

FULL = {
    "limit_jobs": 2000,
    "drain_jobs": 2000,
    "drain_workers": (1, 2, 4),
    "sleep_jobs": 200,
    "sleep_seconds": 0.05,
    "sleep_workers": 4,
    "enqueue_runs": 20,
    "enqueue_variants": True,
    "bulk_jobs": 100000,
    "pickup_samples": 50,
    "idle_seconds": 60.0,
    "big_output": 100 * 1000 * 1000,
    "scale_sizes": (1000, 1000000),
    "scale_claims": 200,
    "scale_cli_runs": 7,
    "scale_cache": True,
    "waiting_sizes": (1000, 1000000),
    "waiting_due": 300,
    "tsp_jobs": 2000,
    "tsp_slots": (1, 2),
    "dash_jobs": 1000000,
    "dash_requests": 7,
    "dash_idle_seconds": 60.0,
    "dash_drain_jobs": 2000,
    "pg_drain_workers": (2, 4),
    "pg_scale_sizes": (1000, 1000000),
    "repeat": 3,
}

QUICK = dict(FULL, limit_jobs=60, drain_jobs=60, sleep_jobs=16, enqueue_runs=3, enqueue_variants=False,
             bulk_jobs=3000, pickup_samples=3, idle_seconds=0.5, big_output=5 * 1000 * 1000,
             scale_sizes=(1000, 10000), scale_claims=30, scale_cli_runs=1, scale_cache=False,
             waiting_sizes=(1000, 10000), waiting_due=30,
             tsp_jobs=30, dash_jobs=10000, dash_requests=2, dash_idle_seconds=1.0, dash_drain_jobs=60,
             pg_scale_sizes=(1000, 10000), repeat=1)


###############################################################################
# Processes and files ##########################################################
###############################################################################

class Procs:
    """Every child we start, so that all of them can be killed at exit.

    Children get their own session, so killing the session takes down what
    they forked too (a supervisor's workers, each in a process group of its own)."""

    def __init__(self):
        self.live = []
        self.atexit = []     # callables run at cleanup (e.g. `tsp -K`)

    def popen(self, args, **kw):
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(args, **kw)
        self.live.append(proc)
        return proc

    def kill(self, proc):
        """SIGKILL `proc` and the rest of its session (a pool's workers have
        process groups of their own)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.live:
            self.live.remove(proc)

    def stop(self, proc, timeout=15):
        """SIGTERM, up to `timeout` seconds to exit, then kill() for what is left."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(proc)

    def run(self, args, timeout, **kw):
        """Run to completion within `timeout` seconds: (returncode, stdout, stderr, seconds)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        t0 = time.perf_counter()
        proc = self.popen(args, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise BenchError("timed out after %ss: %s" % (timeout, " ".join(map(str, args))[:200]))
        elapsed = time.perf_counter() - t0
        self.live.remove(proc)
        return proc.returncode, out, err, elapsed

    def cleanup(self):
        for fn in self.atexit:
            try:
                fn()
            except Exception:
                pass
        self.atexit = []
        for proc in list(self.live):
            self.kill(proc)


PROCS = Procs()


def wait_until(pred, timeout, interval=0.002):
    """Poll pred() until true; False if `timeout` passes first."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def proc_stat(pid):
    """(ppid, utime+stime ticks, session) of a live process, or None if it is
    gone (or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[3])


def session_members(sid):
    """Live processes of session `sid`."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
    return [p for p in pids if (proc_stat(p) or (0, 0, 0))[2] == sid]


def children(pid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[0] == pid:
                out.append(int(name))
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def vm_kb(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def median(values):
    return statistics.median(values) if values else None


def percentile(values, q):
    """Nearest-rank percentile of a list (q in 0..1)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def children_cpu():
    """CPU seconds (user + system) of all our waited-for descendants so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def child_env(**extra):
    env = dict(os.environ)
    env.pop("QUEUECTL_DB", None)
    env.update(extra)
    return env


###############################################################################
# The queuectl under test ######################################################
###############################################################################

class Q:
    """queuectl.py: its path, the command line to run it, and the module."""

    def __init__(self, path, module_name="queuectl_bench_copy"):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise SystemExit("bench.py: %s not found (use --queuectl PATH)" % self.path)
        self._installed = None
        spec = importlib.util.spec_from_file_location(module_name, self.path)
        self.mod = importlib.util.module_from_spec(spec)
        dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True   # leave no __pycache__
        try:
            spec.loader.exec_module(self.mod)
        finally:
            sys.dont_write_bytecode = dont_write

    def cli(self, db, *args):
        return [PY, self.path, "--db", db] + [str(a) for a in args]

    def installed_cli(self, ctx, db, *args):
        """cli() as installed by pip: its console-script wrapper over bytecode
        compiled once, as every installed form runs (a copied install loads
        its cached bytecode too). The drains run both queuectls so: `python3
        queuectl.py` compiles the whole file at every start, a cost of the
        file's size that the enqueue section reports on its own."""
        if self._installed is None:
            self._installed = installed_copy(ctx, ctx.tmp("installed"), self.path)
        return [PY, self._installed, "--db", db] + [str(a) for a in args]

    def store(self, db, **kw):
        """The store for `db`: a SQLite file, or (with a queuectl that has
        open_store) a postgresql:// URL."""
        if is_postgres_url(db):
            if not hasattr(self.mod, "open_store"):
                raise BenchError("%s has no PostgreSQL backend (no open_store)" % self.path)
            return self.mod.open_store(db, **kw)
        return self.mod.Store(db, **kw)

    def enqueue(self, db, commands, cwd):
        """Enqueue through the library (fast, not what is being timed)."""
        now = time.time()
        jobs = [self.mod.validate_job({"command": c}, cwd, now) for c in commands]
        with self.store(db) as store:
            return store.enqueue(jobs, now=now)

    def counts(self, db):
        with self.store(db) as store:
            return store.counts()


###############################################################################
# The limit ####################################################################
###############################################################################

SPAWN_LOOP = r"""
import json, subprocess, sys, time
n, start_at = int(sys.argv[1]), float(sys.argv[2])
while time.time() < start_at:
    time.sleep(0.0005)
t0 = time.time()
for _ in range(n):
    subprocess.run(["/bin/sh", "-c", "true"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
print(json.dumps({"start": t0, "end": time.time(), "n": n}))
"""

# The least a queue must do per job: claim in one write transaction, run the
# command with its output captured, record the result in another.
QUEUE_LOOP = r"""
import json, sqlite3, subprocess, sys, time
db, start_at = sys.argv[1], float(sys.argv[2])
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
conn.execute("PRAGMA synchronous = NORMAL")
while time.time() < start_at:
    time.sleep(0.0005)
t0 = time.time()
n = 0
while True:
    conn.execute("BEGIN IMMEDIATE")
    row = conn.execute("SELECT id, command FROM q WHERE state = 0 ORDER BY id LIMIT 1").fetchone()
    if row is None:
        conn.execute("COMMIT")
        break
    conn.execute("UPDATE q SET state = 1 WHERE id = ?", (row[0],))
    conn.execute("COMMIT")
    p = subprocess.run(["/bin/sh", "-c", row[1]], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE q SET state = 2, exit_code = ?, stdout = ?, stderr = ? WHERE id = ?",
                 (p.returncode, p.stdout, p.stderr, row[0]))
    conn.execute("COMMIT")
    n += 1
print(json.dumps({"start": t0, "end": time.time(), "n": n}))
"""


def run_parallel(code, argv_per_proc, timeout):
    """Start one `python -c code` per argv, all starting work at the same
    moment; returns total items / (last end - first start)."""
    start_at = time.time() + 0.3 + 0.05 * len(argv_per_proc)
    procs = [PROCS.popen([PY, "-c", code] + [str(a) for a in argv] + [repr(start_at)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in argv_per_proc]
    results = []
    cpu0 = children_cpu()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                PROCS.kill(q)
            raise BenchError("limit loop timed out after %ss" % timeout)
        PROCS.live.remove(p)
        if p.returncode != 0:
            raise BenchError("limit loop failed: %s" % err.decode(errors="replace")[-500:])
        results.append(json.loads(out))
    n = sum(r["n"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"jobs": n, "seconds": round(span, 4), "jobs_per_s": round(n / span, 1),
            "cpu_ms_per_job": round((children_cpu() - cpu0) / n * 1000, 3)}


def tasks_limit(ctx):
    n = ctx.size["limit_jobs"]
    tasks = []
    for procs in (1, 2):
        tasks.append(("spawn_%dp" % procs,
                      lambda procs=procs: run_parallel(SPAWN_LOOP, [(n // procs,)] * procs, timeout=60 + n / 20)))

    def queue_loop(procs):
        db = os.path.join(ctx.tmp("limit"), "q.db")
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("""CREATE TABLE q (id INTEGER PRIMARY KEY, command TEXT NOT NULL,
                        state INTEGER NOT NULL, exit_code INTEGER, stdout BLOB, stderr BLOB)""")
        conn.execute("CREATE INDEX q_pending ON q (id) WHERE state = 0")
        conn.executemany("INSERT INTO q (command, state) VALUES ('true', 0)", [()] * n)
        conn.close()
        r = run_parallel(QUEUE_LOOP, [(db,)] * procs, timeout=60 + n / 20)
        conn = sqlite3.connect(db)
        done = conn.execute("SELECT count(*) FROM q WHERE state = 2").fetchone()[0]
        conn.close()
        if done != n:
            raise BenchError("minimal queue loop completed %d of %d jobs" % (done, n))
        shutil.rmtree(os.path.dirname(db), ignore_errors=True)
        return r
    for procs in (1, 2):
        tasks.append(("queue_%dp" % procs, lambda procs=procs: queue_loop(procs)))
    return tasks, None


def best(runs):
    """The run with the highest throughput, with every run's figure kept."""
    top = max(runs, key=lambda r: r["jobs_per_s"])
    out = dict(top)
    if len(runs) > 1:
        out["all_jobs_per_s"] = [r["jobs_per_s"] for r in runs]
    return out


###############################################################################
# Drain ########################################################################
###############################################################################

def drain(ctx, name, command, n, workers, q=None, pg=False):
    """Time `worker start --once --count workers` over n copies of command
    (with queuectl `q`, by default the one under test; with `pg`, in a new
    schema on the --pg server)."""
    q = q or ctx.q
    d = ctx.tmp(name)
    db = ctx.pg.new_queue(name) if pg else os.path.join(d, "queue.db")
    q.enqueue(db, [command] * n, d)
    log = open(os.path.join(d, "worker.log"), "wb")
    cpu0 = children_cpu()
    server0 = ctx.pg.cpu() if pg else None
    wall0 = time.time()
    try:
        code, _, _, secs = PROCS.run(q.installed_cli(ctx, db, "worker", "start", "--once", "--count", workers),
                                     timeout=60 + n * 0.5, cwd=d, env=child_env(),
                                     stdout=log, stderr=log)
    finally:
        log.close()
    counts = q.counts(db)
    if code != 0 or counts["completed"] != n:
        with open(os.path.join(d, "worker.log"), "rb") as f:
            tail = f.read()[-800:].decode(errors="replace")
        raise BenchError("drain (%d workers) exited %s with counts %s: %s" % (workers, code, counts, tail))
    wall1 = time.time()
    cpu = children_cpu() - cpu0
    out = {"jobs": n, "workers": workers, "seconds": round(secs, 4), "jobs_per_s": round(n / secs, 1),
           "cpu_ms_per_job": round(cpu / n * 1000, 3)}
    server1 = ctx.pg.cpu() if server0 is not None else None
    if server1 is not None:
        # (the counts read above included; a few ms of 2,000 jobs)
        out["server_cpu_ms_per_job"] = round((server1 - server0) / n * 1000, 3)
    out.update(run_timeline(db, wall0, wall1, ctx.pg if pg else None))
    if pg:
        ctx.pg.drop(db)
    shutil.rmtree(d, ignore_errors=True)
    return out


def run_timeline(db, wall0, wall1, pg=None):
    """Where a drain's time went, from the runs table: start-up (command
    started -> first run), shutdown (last run finished -> exit), the mean
    recorded run (claim -> result) and the mean gap between one run's end and
    the same worker's next claim."""
    query = "SELECT worker_id, started_at, finished_at FROM runs ORDER BY worker_id, started_at"
    if pg is not None:
        rows = pg.rows(db, query)
    else:
        try:
            conn = sqlite3.connect(db)
            try:
                rows = conn.execute(query).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return {}
    if not rows:
        return {}
    gaps = [b[1] - a[2] for a, b in zip(rows, rows[1:]) if a[0] == b[0] and a[2] is not None]
    return {
        "startup_s": round(min(r[1] for r in rows) - wall0, 4),
        "shutdown_s": round(wall1 - max(r[2] for r in rows), 4),
        "run_ms": round(statistics.mean(r[2] - r[1] for r in rows) * 1000, 3),
        "gap_ms": round(statistics.mean(gaps) * 1000, 3) if gaps else None,
    }


def tasks_drain(ctx):
    """The drains, and with --baseline the same drains by another queuectl.py
    (say the last release) in the same rounds, for a ratio from one run."""
    n = ctx.size["drain_jobs"]
    tasks = [("workers_%d" % w, lambda w=w: drain(ctx, "drain%d" % w, "true", n, w))
             for w in ctx.size["drain_workers"]]
    if ctx.baseline is not None:
        tasks += [("baseline_workers_%d" % w, lambda w=w: drain(ctx, "base%d" % w, "true", n, w, ctx.baseline))
                  for w in ctx.size["drain_workers"]]
    if ctx.pg is not None:
        tasks += [("pg_workers_%d" % w, lambda w=w: drain(ctx, "pgdrain%d" % w, "true", n, w, pg=True))
                  for w in ctx.size["pg_drain_workers"]]
    return tasks, None


def tasks_sleep(ctx):
    n, s, w = ctx.size["sleep_jobs"], ctx.size["sleep_seconds"], ctx.size["sleep_workers"]
    # What one such command costs on its own (shell, exec, the sleep itself),
    # started the minimal way: no queue can run it faster.
    own = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", "sleep %g" % s], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        own.append(time.perf_counter() - t0)

    def one():
        r = drain(ctx, "sleep", "sleep %g" % s, n, w)
        r["ideal_seconds"] = round(n * s / w, 4)
        r["efficiency"] = round(n * s / w / r["seconds"], 3)
        return r

    def finish(res):
        out = res["sleep"]
        out["command_alone_ms"] = round(median(own) * 1000, 2)
        # The same, against the command's own run time instead of the nominal sleep.
        out["efficiency_vs_command"] = round(n * median(own) / w / out["seconds"], 3)
    return [("sleep", one)], finish


###############################################################################
# Enqueue ######################################################################
###############################################################################

def timed_runs(variants, runs, cwd):
    """Median wall time (ms) of each command, the variants interleaved so
    that load from elsewhere on the machine hits them alike."""
    times = {k: [] for k in variants}
    for _ in range(runs):
        for k, (args, env) in variants.items():
            code, _, err, secs = PROCS.run(args, timeout=60, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
            if code != 0:
                raise BenchError("%s exited %d: %s" % (k, code, err.decode(errors="replace")[-300:]))
            times[k].append(secs * 1000)
    return {k: {"median_ms": round(median(v), 2), "min_ms": round(min(v), 2), "runs": len(v)}
            for k, v in times.items()}


def import_profile(args, cwd, env, runs=3):
    """Modules a command imports (from -X importtime), and the cumulative ms of
    each top-level import (the least over `runs` runs: start-up times are noisy)."""
    mods, top = set(), {}
    for _ in range(runs):
        code, _, err, _ = PROCS.run([args[0], "-X", "importtime"] + args[1:], timeout=60, cwd=cwd, env=env,
                                    stdout=subprocess.DEVNULL)
        this = {}
        for line in err.decode(errors="replace").splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            parts = line[len("import time:"):].split("|")
            try:
                cumulative = int(parts[1])
            except ValueError:
                continue
            raw = parts[2]
            name = raw.strip()
            mods.add(name)
            if (len(raw) - len(raw.lstrip()) - 1) // 2 == 0:
                this[name] = this.get(name, 0) + cumulative / 1000.0
        for name, ms in this.items():
            top[name] = min(top.get(name, ms), ms)
    return mods, top


#: What pip writes as the `queuectl` console script ([project.scripts] in
#: pyproject.toml): the module is imported, so its bytecode is cached.
PIP_WRAPPER = """# -*- coding: utf-8 -*-
import re
import sys
from queuectl import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def installed_copy(ctx, d, path=None):
    """A copy of queuectl.py (`path`, by default the one under test) with its
    bytecode compiled and pip's console-script wrapper beside it: `python3
    WRAPPER` runs like the installed `queuectl`."""
    mod = os.path.join(d, "installed")
    os.makedirs(mod)
    target = os.path.join(mod, "queuectl.py")
    shutil.copy(path or ctx.q.path, target)
    py_compile.compile(target, cfile=importlib.util.cache_from_source(target), doraise=True)
    wrapper = os.path.join(mod, "queuectl")
    with open(wrapper, "w") as f:
        f.write(PIP_WRAPPER)
    return wrapper


def copied_install(ctx, d):
    """README's first recipe, `install -m 755 queuectl.py BIN/queuectl`, with
    python3 on PATH this same Python and a bytecode cache of its own (the
    first call, made here, fills it). Returns (command, env)."""
    bindir = os.path.join(d, "bin")
    os.makedirs(bindir)
    target = os.path.join(bindir, "queuectl")
    shutil.copy(ctx.q.path, target)
    os.chmod(target, 0o755)
    os.symlink(PY, os.path.join(bindir, "python3"))
    venv_cfg = os.path.join(os.path.dirname(os.path.dirname(PY)), "pyvenv.cfg")
    if os.path.isfile(venv_cfg):
        # A venv's python is that venv only beside its pyvenv.cfg (in its
        # directory or the one above): else the link would start the base
        # Python, with site-packages (and .pth hooks) the floor does not run.
        # and its site-packages the venv's own.
        shutil.copy(venv_cfg, os.path.join(d, "pyvenv.cfg"))
        os.symlink(os.path.join(os.path.dirname(venv_cfg), "lib"), os.path.join(d, "lib"))
    env = child_env(PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                    XDG_CACHE_HOME=os.path.join(d, "cache"))
    PROCS.run([target, "--version"], env=env, timeout=60)
    return target, env


def section_enqueue(ctx):
    d = ctx.tmp("enqueue")
    db = os.path.join(d, "queue.db")
    env = child_env()
    ctx.q.enqueue(db, ["true"], d)          # the schema exists, as on any real call
    wrapper = installed_copy(ctx, d)
    copied, copied_env = copied_install(ctx, d)
    variants = {
        "floor": ([PY, "-c", "import sqlite3"], env),
        "enqueue": ([copied, "--db", db, "enqueue", "--", "true"], copied_env),
        "enqueue_pip": ([PY, wrapper, "--db", db, "enqueue", "--", "true"], env),
        "enqueue_script": (ctx.q.cli(db, "enqueue", "--", "true"), env),
    }
    if ctx.size["enqueue_variants"]:
        # Without site hooks: the .pth files of some site-packages import
        # modules at every start-up, which hides what queuectl itself imports.
        variants["floor_nosite"] = ([PY, "-S", "-c", "import sqlite3"], env)
        variants["enqueue_nosite"] = ([PY, "-S", wrapper, "--db", db, "enqueue", "--", "true"], env)
    res = timed_runs(variants, ctx.size["enqueue_runs"], d)
    floor_mods, _ = import_profile([PY, "-S", "-c", "import sqlite3"], d, env, runs=1)
    mods, top = import_profile([PY, "-S", wrapper, "--db", db, "enqueue", "--", "true"], d, env,
                               runs=3 if ctx.size["enqueue_variants"] else 1)
    extra = {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1]) if k not in floor_mods}
    res["imports"] = {
        "measured_with": "-S (no site hooks), installed form",
        "multiprocessing": any(m == "multiprocessing" or m.startswith("multiprocessing.") for m in mods),
        "extra_modules": sorted(mods - floor_mods),
        "extra_top_level_ms": dict(list(extra.items())[:8]),
    }
    # The cost of compiling the script, which `python3 queuectl.py` pays on every run.
    with open(ctx.q.path, "rb") as f:
        src = f.read()
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        compile(src, ctx.q.path, "exec")
        t.append((time.perf_counter() - t0) * 1000)
    res["compile_script_ms"] = round(min(t), 2)
    # The enqueue transaction alone, in-process: durable (FULL, as the CLI
    # commits: one fsync) and, for comparison, NORMAL.
    now = time.time()
    job = [ctx.q.mod.validate_job({"command": "true"}, d, now)]
    for name, durable in (("commit_full_ms", True), ("commit_normal_ms", False)):
        t = []
        with ctx.q.mod.Store(db, durable=durable) as store:
            for _ in range(max(5, ctx.size["enqueue_runs"])):
                t0 = time.perf_counter()
                store.enqueue(job)
                t.append((time.perf_counter() - t0) * 1000)
        res[name] = round(median(t), 3)
    shutil.rmtree(d, ignore_errors=True)
    return res


def section_bulk(ctx):
    n = ctx.size["bulk_jobs"]
    d = ctx.tmp("bulk")
    db = os.path.join(d, "queue.db")
    path = os.path.join(d, "jobs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write('{"command": "echo %d"}\n' % i)
    ctx.q.enqueue(db, ["true"], d)
    with open(os.path.join(d, "ids.txt"), "wb") as out:
        code, _, err, secs = PROCS.run(ctx.q.cli(db, "enqueue", "--file", path), timeout=60 + n / 500,
                                       cwd=d, env=child_env(), stdout=out)
    if code != 0:
        raise BenchError("enqueue --file exited %d: %s" % (code, err.decode(errors="replace")[-300:]))
    pending = ctx.q.counts(db)["pending"]
    if pending != n + 1:
        raise BenchError("enqueue --file: %d pending, expected %d" % (pending, n + 1))
    shutil.rmtree(d, ignore_errors=True)
    return {"bulk": {"jobs": n, "seconds": round(secs, 4), "jobs_per_s": round(n / secs, 1)}}


###############################################################################
# An idle worker: pickup latency, CPU, memory ##################################
###############################################################################

class RunningWorker:
    """`queuectl worker start` in the background, stopped at the end: as
    installed (cached bytecode), or with `script` as `python3 queuectl.py`."""

    def __init__(self, ctx, d, db, script=False):
        self.ctx, self.db = ctx, db
        self.log = open(os.path.join(d, "worker%s.log" % ("-script" if script else "")), "wb")
        argv = ctx.q.cli(db, "worker", "start") if script else ctx.q.installed_cli(ctx, db, "worker", "start")
        self.proc = PROCS.popen(argv, cwd=d, env=child_env(), stdout=self.log, stderr=self.log)

        def registered():
            if self.proc.poll() is not None:
                raise BenchError("worker exited at start (%s)" % self.proc.returncode)
            with ctx.q.store(db) as s:
                return len(s.workers()) == 1 and len(children(self.proc.pid)) == 1
        if not wait_until(registered, 20, 0.02):
            raise BenchError("worker did not register within 20 s")
        self.worker_pid = children(self.proc.pid)[0]

    def pids(self):
        return [self.proc.pid] + descendants(self.proc.pid)

    def cpu_ticks(self):
        """(supervisor, everything below it) CPU ticks so far."""
        sup = proc_stat(self.proc.pid)
        rest = 0
        for pid in descendants(self.proc.pid):
            st = proc_stat(pid)
            if st is not None:
                rest += st[1]
        return (sup[1] if sup else 0), rest

    def stop(self):
        PROCS.stop(self.proc)
        self.log.close()


def section_pickup(ctx):
    d = ctx.tmp("pickup")
    db = os.path.join(d, "queue.db")
    ctx.q.enqueue(db, ["true"], d)
    w = RunningWorker(ctx, d, db)
    res = {}
    try:
        pickup_and_idle(ctx, d, db, w, res)
        # Memory: peak RSS of the worker process, idle, then after a job printed a lot.
        idle_kb = vm_kb(w.worker_pid, "VmHWM")
        sup_kb = vm_kb(w.proc.pid, "VmHWM")
        size = ctx.size["big_output"]
        (job_id,) = ctx.q.enqueue(db, ["head -c %d /dev/zero" % size], d)

        def done():
            with ctx.q.mod.Store(db) as s:
                return s.get(job_id)["state"] == "completed"
        if not wait_until(done, 120, 0.02):
            raise BenchError("the %d-byte job did not complete within 120 s" % size)
        big_kb = vm_kb(w.worker_pid, "VmHWM")
        conn = sqlite3.connect(db)
        try:
            kept = conn.execute("SELECT length(stdout) FROM runs WHERE job_id = ? ORDER BY run DESC LIMIT 1",
                                (job_id,)).fetchone()[0] or 0
        finally:
            conn.close()
        res["memory"] = {"worker_idle_mb": round(idle_kb / 1024.0, 1), "worker_after_mb": round(big_kb / 1024.0, 1),
                         "growth_mb": round((big_kb - idle_kb) / 1024.0, 1),
                         "supervisor_mb": round(sup_kb / 1024.0, 1),
                         "output_bytes": size, "stdout_kept_bytes": kept}
    finally:
        w.stop()
    # Run as `python3 queuectl.py`, CPython keeps the script's syntax tree
    # for as long as the script runs: every forked worker carries it.
    w = RunningWorker(ctx, d, db, script=True)
    try:
        res["memory"]["worker_idle_script_mb"] = round(vm_kb(w.worker_pid, "VmHWM") / 1024.0, 1)
    finally:
        w.stop()
    shutil.rmtree(d, ignore_errors=True)
    return res


def pickup_and_idle(ctx, d, db, w, res):
    """res["pickup"]: enqueue -> job start latency with worker `w` idle on
    `db` (which holds one job, `true`); res["idle_cpu"]: its CPU use idle."""
    wait_until(lambda: ctx.q.counts(db)["completed"] == 1, 10, 0.01)
    # Pickup latency: enqueue returns (committed) -> the job's first command runs.
    lat = []
    store = ctx.q.store(db)
    rng = random.Random(4)
    try:
        for i in range(ctx.size["pickup_samples"]):
            time.sleep(rng.uniform(0.1, 0.25))       # let the worker go idle again
            stamp = os.path.join(d, "t%d" % i)
            job = ctx.q.mod.validate_job(
                {"command": "date +%%s%%N > %s.tmp && mv %s.tmp %s" % (stamp, stamp, stamp)},
                d, time.time())
            store.enqueue([job])
            returned = time.time()
            if not wait_until(lambda: os.path.exists(stamp), 10, 0.001):
                raise BenchError("job %d did not start within 10 s" % i)
            with open(stamp) as f:
                started = int(f.read().strip()) / 1e9
            lat.append((started - returned) * 1000)
    finally:
        store.close()
    res["pickup"] = {"samples": len(lat), "p50_ms": round(percentile(lat, 0.5), 2),
                     "p95_ms": round(percentile(lat, 0.95), 2), "max_ms": round(max(lat), 2),
                     "min_ms": round(min(lat), 2)}
    # Idle CPU of the supervisor and its workers.
    time.sleep(1.0)
    secs = ctx.size["idle_seconds"]
    t0, (s0, w0) = time.monotonic(), w.cpu_ticks()
    time.sleep(secs)
    t1, (s1, w1) = time.monotonic(), w.cpu_ticks()

    def pct(ticks):
        return round(ticks / CLK_TCK / (t1 - t0) * 100, 3)
    res["idle_cpu"] = {"seconds": round(t1 - t0, 2), "cpu_percent": pct(s1 - s0 + w1 - w0),
                       "supervisor_percent": pct(s1 - s0), "worker_percent": pct(w1 - w0),
                       "tick_ms": round(1000.0 / CLK_TCK, 1)}


###############################################################################
# Scale ########################################################################
###############################################################################

def build_db(q, path, n, pending):
    """A queuectl database with n jobs: the newest `pending` pending, the rest
    completed with one run each, spread over the last 30 days. Created by
    queuectl's own Store (so SCHEMA and triggers are queuectl's), filled by SQL."""
    q.mod.Store(path, durable=False).close()
    conn = sqlite3.connect(path, isolation_level=None)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    # Columns of newer schemas, when present: name -> value for a completed job / a pending one.
    extra = [(c, v) for c, v in (("run_count", "CASE WHEN x > :n - :p THEN 0 ELSE 1 END"),) if c in columns]
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -200000")
    now = time.time()
    span = 30 * 86400.0
    conn.execute("BEGIN")
    conn.execute("""
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n)
        INSERT INTO jobs (seq, id, command, cwd, state, priority, attempts, max_retries, timeout,
                          run_at, created_at, updated_at, exit_code, outcome%s)
        SELECT x, printf('bench%%010d', x), 'echo ' || x, '/tmp',
               CASE WHEN x > :n - :p THEN 'pending' ELSE 'completed' END, 0,
               CASE WHEN x > :n - :p THEN 0 ELSE 1 END, 3, NULL,
               :now - :span + x * :step, :now - :span + x * :step, :now - :span + x * :step + 0.01,
               CASE WHEN x > :n - :p THEN NULL ELSE 0 END,
               CASE WHEN x > :n - :p THEN NULL ELSE 'exit 0' END%s
        FROM c""" % ("".join(", " + c for c, _ in extra), "".join(", " + v for _, v in extra)), {"n": n, "p": pending, "now": now, "span": span, "step": span / n})
    conn.execute("""
        INSERT INTO runs (job_id, run, attempt, worker_id, started_at, finished_at, exit_code,
                          outcome, result_state, stdout, stderr)
        SELECT id, 1, 1, 'bench:1:1', created_at, updated_at, 0, 'exit 0', 'completed', X'', X''
        FROM jobs WHERE state = 'completed'""")
    # The per-state counts (kept by triggers, or by Store.enqueue itself):
    # set from the rows, whichever way this schema keeps them.
    set_counts(conn)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def cached_db(ctx, name, prefix, key, big, build):
    """Path of a fresh copy of the database that build(path) writes, in a
    new directory `name`; when `big`, built once and cached in
    $QUEUECTL_BENCH_CACHE as PREFIX-HASH.db (the hash of `key`, the builder's
    version and queuectl's SCHEMA, so another schema gets its own copy)."""
    d = ctx.tmp(name)
    path = os.path.join(d, "queue.db")
    if not ctx.size["scale_cache"] or not big:
        build(path)
        return path
    digest = hashlib.sha256(("%s|%s|%s|%s" % (BUILDER_VERSION, ctx.q.mod.SCHEMA_VERSION, ctx.q.mod.SCHEMA,
                                              key)).encode()).hexdigest()[:12]
    cache_dir = os.environ.get("QUEUECTL_BENCH_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                        "queuectl-bench-cache")
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, "%s-%s.db" % (prefix, digest))
    if not os.path.exists(cached):
        for old in os.listdir(cache_dir):          # an older schema's copy
            if old.startswith(prefix + "-"):
                os.remove(os.path.join(cache_dir, old))
        t0 = time.perf_counter()
        partial = cached + ".partial"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(partial + suffix):
                os.remove(partial + suffix)
        build(partial)
        os.rename(partial, cached)
        ctx.note("built the %s database in %.1f s (cached as %s)" % (prefix, time.perf_counter() - t0, cached))
    shutil.copyfile(cached, path)
    return path


def scale_db(ctx, n, pending):
    """Path of a fresh copy of an n-job database (built once and cached for big n)."""
    return cached_db(ctx, "scale%d" % n, "jobs-%d" % n, "%d|%d" % (n, pending), n >= 100000,
                     lambda path: build_db(ctx.q, path, n, pending))


#: Jobs stored beside the due ones (priority 0), at priority 10: kind -> state,
#: seconds until due (negative: due), attempts, queue (SQL of x, the row
#: number), whether it needs the queues of schema 4. "scheduled": enqueued for
#: tomorrow; "backoff": failed, retrying in an hour; "paused": in a paused
#: queue; "blocked": waiting for a job scheduled tomorrow; "limited": in a
#: queue with a limit of 1 and one job running; "queues20": due, spread over
#: 20 queues (not waiting: the claim may take them; its cost is what counts).
WAITING_KINDS = {
    "scheduled": ("pending", 86400.0, 0, "'default'", False),
    "backoff": ("failed", 3600.0, 1, "'default'", False),
    "paused": ("pending", -60.0, 0, "'paused'", True),
    "blocked": ("pending", -60.0, 0, "'default'", True),
    "limited": ("pending", -60.0, 0, "'limited'", True),
    "queues20": ("pending", -60.0, 0, "printf('q%02d', x % 20)", True),
}


def set_counts(conn):
    """Set the counts table from the rows (per state, or per queue and state)."""
    if "queue" in {r[1] for r in conn.execute("PRAGMA table_info(counts)")}:
        conn.execute("UPDATE counts SET n = 0")
        for queue, state, n in conn.execute("SELECT queue, state, count(*) FROM jobs GROUP BY queue, state").fetchall():
            conn.execute("UPDATE counts SET n = ? WHERE queue = ? AND state = ?", (n, queue, state))
    else:
        conn.execute("UPDATE counts SET n = (SELECT count(*) FROM jobs WHERE jobs.state = counts.state)")


def build_waiting_db(q, path, n, kind):
    """n jobs of priority 10 of one of WAITING_KINDS, written by SQL into a
    database created by queuectl's Store (queues and dependencies through the
    Store). The due jobs are added later, by Store.enqueue."""
    state, later, attempts, queue, _ = WAITING_KINDS[kind]
    store = q.mod.Store(path, durable=False)
    now = time.time()
    parent = None
    if kind == "blocked":
        parent = store.enqueue([q.mod.validate_job({"command": "true", "delay": 86400}, "/tmp", now)], now=now)[0]
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    extra = [(c, v) for c, v in (("run_count", ":attempts"), ("queue", queue),
                                  ("ready", "CASE WHEN :later < 0 AND :parent IS NULL THEN 1 ELSE 0 END"),
                                  ("blocked", "CASE WHEN :parent IS NULL THEN 0 ELSE 1 END")) if c in columns]
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -200000")
    conn.execute("BEGIN")
    conn.execute("""
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n)
        INSERT INTO jobs (id, command, cwd, state, priority, attempts, max_retries, timeout,
                          run_at, created_at, updated_at, exit_code, outcome%s)
        SELECT printf('wait%%010d', x), 'echo ' || x, '/tmp', :state, 10, :attempts, 3, NULL,
               :now + :later + x * 0.001, :now, :now,
               CASE WHEN :attempts THEN 1 ELSE NULL END, CASE WHEN :attempts THEN 'exit 1' ELSE NULL END%s
        FROM c""" % ("".join(", " + c for c, _ in extra), "".join(", " + v for _, v in extra)),
                 {"n": n, "state": state, "attempts": attempts, "now": now, "later": later, "parent": parent})
    if parent is not None:
        conn.execute("INSERT INTO deps (job_id, after_id) SELECT id, ? FROM jobs WHERE id LIKE 'wait%'", (parent,))
    conn.execute("COMMIT")
    conn.close()
    store = q.mod.Store(path, durable=False)
    for name in {"paused": ["paused"], "limited": ["limited"],
                 "queues20": ["q%02d" % i for i in range(20)]}.get(kind, []):
        store.set_queue(name, **({"paused": 1} if kind == "paused" else
                                 {"max_running": 1} if kind == "limited" else {}))
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    set_counts(conn)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def waiting_db(ctx, n, kind):
    """Path of a fresh copy of an n-waiting-job database. Big ones are cached
    for 20 minutes at most: their jobs must still be waiting when measured."""
    return cached_db(ctx, "waiting-%s-%d" % (kind, n), "waiting-%s-%d" % (kind, n),
                     "%d|%s|%d" % (n, kind, time.time() // 1200), n >= 100000,
                     lambda path: build_waiting_db(ctx.q, path, n, kind))


def section_waiting(ctx, res):
    """Issues 13 and 9: drain `waiting_due` due jobs (priority 0) beside 1k
    and 1M jobs of each of WAITING_KINDS at priority 10, two ways, small and
    big side by side: claim + finish in-process (alternating rounds, least
    round median counts), and a real `worker start --once --count 1` on a
    second copy of each database (not for "queues20", whose jobs are due)."""
    q = ctx.q
    due = ctx.size["waiting_due"]
    pid = os.getpid()
    wid = "%s:%d:1" % (q.mod.this_host(), pid)
    holder = "%s:%d:%s" % (q.mod.this_host(), pid, q.mod.process_start(pid))    # alive: never reclaimed
    ok = q.mod.RunResult(0, "exit 0", b"", b"", 0.001)
    rounds, warm = 4, 10
    for kind, spec in WAITING_KINDS.items():
        if spec[4] and not hasattr(q.mod.Store, "set_queue"):
            continue            # a queuectl without named queues
        dbs, stores = {}, {}
        try:
            for n in ctx.size["waiting_sizes"]:
                dbs[n] = [waiting_db(ctx, n, kind) for _ in range(2)]
                for db in dbs[n]:
                    q.enqueue(db, ["true"] * (due + warm), os.path.dirname(db))
                    if kind == "limited":
                        with q.mod.Store(db, durable=False) as store:
                            store.register_worker(holder)
                            store.claim(holder, lease=86400 * 7, queues=["limited"])
                stores[n] = q.mod.Store(dbs[n][0], durable=False)
                stores[n].register_worker(wid)

            def claim_finish(n):
                t0 = time.perf_counter()
                job = stores[n].claim(wid)
                if job is None or (job["priority"] != 0 and kind != "queues20"):
                    raise BenchError("claimed %r beside %d %s jobs" % (job and job["id"], n, kind))
                stores[n].finish(job["id"], job["run"], wid, ok)
                return (time.perf_counter() - t0) * 1e6

            for n in stores:
                for _ in range(warm):
                    claim_finish(n)
            per_round = {n: [] for n in stores}
            for _ in range(rounds):
                for n in stores:
                    per_round[n].append(median([claim_finish(n) for _ in range(due // rounds)]))
            for n in stores:
                stores[n].unregister_worker(wid)
                stores[n].close()
            stores = {}
            for n in dbs:
                res["waiting_%s_%d" % (kind, n)] = {
                    "jobs": n, "kind": kind, "due": due + warm,
                    "claim_finish_us": round(min(per_round[n]), 1),
                    "claim_finish_round_medians_us": [round(x, 1) for x in per_round[n]]}
                if kind == "queues20":
                    continue
                db = dbs[n][1]
                code, _, err, secs = PROCS.run(q.cli(db, "worker", "start", "--once", "--count", 1),
                                               timeout=120 + due, cwd=os.path.dirname(db), env=child_env())
                counts = q.counts(db)
                if code != 0 or counts["completed"] != due + warm:
                    raise BenchError("drain beside %d %s jobs: exit %s, counts %s: %s" % (
                        n, kind, code, counts, err.decode(errors="replace")[-300:]))
                res["waiting_%s_%d" % (kind, n)]["drain_s"] = round(secs, 3)
            timed = {}
            for n in dbs:
                timed[(n, "status")] = (q.cli(dbs[n][1], "status"), child_env())
                timed[(n, "list")] = (q.cli(dbs[n][1], "list", "--limit", "20"), child_env())
            for (n, k), v in timed_runs(timed, ctx.size["scale_cli_runs"], ctx.root).items():
                res["waiting_%s_%d" % (kind, n)]["%s_ms" % k] = v["median_ms"]
        finally:
            for store in stores.values():
                store.close()
            for paths in dbs.values():
                shutil.rmtree(os.path.dirname(paths[0]), ignore_errors=True)
                shutil.rmtree(os.path.dirname(paths[1]), ignore_errors=True)


#: Claims made on each database before claim_costs() starts timing.
SCALE_WARM = 20


def claim_costs(ctx, dbs, claims, extra=None):
    """{n: {"claim_finish_us": ..., ...}}: claim + finish in-process on each
    database of `dbs` ({n: path or URL}), after a warm-up, in alternating
    rounds so that load from elsewhere hits all alike (the least round median
    counts); extra(store), if given, adds its own figures."""
    q = ctx.q
    rounds = 4
    stores, res = {}, {}
    wid = "%s:%d:1" % (q.mod.this_host(), os.getpid())
    ok = q.mod.RunResult(0, "exit 0", b"", b"", 0.001)
    try:
        for n, db in dbs.items():
            stores[n] = q.store(db, durable=False)
            stores[n].register_worker(wid)

        def claim_finish(n):
            t0 = time.perf_counter()
            job = stores[n].claim(wid)
            if job is None:
                raise BenchError("nothing to claim in the %d-job database" % n)
            stores[n].finish(job["id"], job["run"], wid, ok)
            return (time.perf_counter() - t0) * 1e6

        for n in dbs:
            for _ in range(SCALE_WARM):
                claim_finish(n)
        per_round = {n: [] for n in dbs}
        for _ in range(rounds):
            for n in dbs:
                per_round[n].append(median([claim_finish(n) for _ in range(max(1, claims // rounds))]))
        for n in dbs:
            res[n] = {"claim_finish_us": round(min(per_round[n]), 1),
                      "claim_finish_round_medians_us": [round(x, 1) for x in per_round[n]]}
            if extra is not None:
                res[n].update(extra(stores[n]))
            stores[n].unregister_worker(wid)
    finally:
        for store in stores.values():
            store.close()
    return res


def section_scale(ctx):
    """Both databases side by side: claim+finish in-process (after a warm-up,
    in alternating rounds so that load from elsewhere hits both alike; the
    least round median counts), then the CLI commands, interleaved too."""
    claims = ctx.size["scale_claims"]
    q = ctx.q
    sizes = ctx.size["scale_sizes"]
    dbs, res = {}, {}
    for n in sizes:
        pending = claims + SCALE_WARM + 50 + n // 100
        dbs[n] = scale_db(ctx, n, pending)
        res["jobs_%d" % n] = {"jobs": n, "pending": pending,
                              "db_mb": round(os.path.getsize(dbs[n]) / 1e6, 1)}

    def idle_poll(store):
        polls = []
        for _ in range(200):
            t0 = time.perf_counter()
            store.data_version()
            store.has_due(time.time())
            polls.append((time.perf_counter() - t0) * 1e6)
        return {"idle_poll_us": round(median(polls), 1)}
    for n, r in claim_costs(ctx, dbs, claims, idle_poll).items():
        res["jobs_%d" % n].update(r)
    timed = {}
    for n in sizes:
        timed[(n, "status")] = (q.cli(dbs[n], "status"), child_env())
        timed[(n, "list")] = (q.cli(dbs[n], "list", "--limit", "20"), child_env())
        timed[(n, "stats")] = (q.cli(dbs[n], "stats"), child_env())
    t = timed_runs(timed, ctx.size["scale_cli_runs"], ctx.root)
    for (n, k), v in t.items():
        res["jobs_%d" % n]["%s_ms" % k] = v["median_ms"]
    for n in sizes:
        shutil.rmtree(os.path.dirname(dbs[n]), ignore_errors=True)
    section_waiting(ctx, res)
    return res


###############################################################################
# PostgreSQL ###################################################################
###############################################################################

def is_postgres_url(db):
    return db.startswith(("postgresql://", "postgres://"))


class PgServer:
    """The --pg server: every queue a schema of its own (queuectl_bench_PID_NAME),
    reached through the URL's options=-csearch_path=..., dropped by drop() or
    at the end. Uses chaos.py's connection helpers (psycopg 3, or psycopg2)."""

    def __init__(self, url):
        sys.path.insert(0, HERE)
        try:
            import chaos
        finally:
            sys.path.remove(HERE)
        self.url, self.chaos, self.schemas = url, chaos, {}
        try:
            self.admin = chaos.pg_connect(url)
        except ImportError:
            raise SystemExit("bench.py: --pg needs psycopg (pip install 'psycopg[binary]') or psycopg2 in %s" % PY)

    def sql(self, query, params=None, conn=None):
        cur = (conn or self.admin).cursor()
        cur.execute(query, params)
        return cur.fetchall() if cur.description else None

    def new_queue(self, name):
        """The URL of a new, empty schema."""
        schema = "queuectl_bench_%d_%s" % (os.getpid(), name)
        self.sql("DROP SCHEMA IF EXISTS %s CASCADE" % schema)
        self.sql("CREATE SCHEMA %s" % schema)
        url = self.chaos.with_search_path(self.url, schema)
        self.schemas[url] = schema
        return url

    def rows(self, url, query, params=None):
        conn = self.chaos.pg_connect(url)
        try:
            return self.sql(query, params, conn)
        finally:
            conn.close()

    def drop(self, url):
        self.sql("DROP SCHEMA IF EXISTS %s CASCADE" % self.schemas.pop(url))

    def close(self):
        for url in list(self.schemas):
            self.drop(url)
        self.admin.close()

    def server_version(self):
        return self.sql("SHOW server_version")[0][0]

    def cpu(self):
        """CPU seconds the server has used, when it runs on this machine and
        its processes can be read (root, or its owner): its processes' own,
        and the backends that have exited (in the postmaster's cutime). None
        otherwise. Other clients of the same server count too."""
        try:
            if not hasattr(self, "_postmaster"):
                self._postmaster = None
                with open(os.path.join(self.sql("SHOW data_directory")[0][0], "postmaster.pid")) as f:
                    self._postmaster = int(f.readline())
            if self._postmaster is None:
                return None
            ticks = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open("/proc/%s/stat" % pid) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(pid) == self._postmaster:
                    ticks += sum(int(x) for x in fields[11:15])    # utime stime cutime cstime
                elif int(fields[1]) == self._postmaster:
                    ticks += int(fields[11]) + int(fields[12])
            return ticks / os.sysconf("SC_CLK_TCK")
        except Exception:       # another machine, not allowed to read it, SHOW refused to a non-superuser
            return None


def build_pg_queue(ctx, url, n, pending):
    """build_db on PostgreSQL: n jobs (the newest `pending` pending, the rest
    completed with one run each) in the schema of `url`, created by queuectl's
    own store and filled by SQL; the counts set from the rows; analyzed."""
    ctx.q.store(url, durable=False).close()
    conn = ctx.pg.chaos.pg_connect(url)
    try:
        now, span = time.time(), 30 * 86400.0
        params = {"n": n, "p": pending, "now": now, "span": span, "step": span / n}
        ctx.pg.sql("""
            INSERT INTO jobs (id, command, cwd, state, priority, attempts, max_retries, timeout,
                              run_at, created_at, updated_at, exit_code, outcome, run_count)
            SELECT 'bench' || lpad(x::text, 10, '0'), 'echo ' || x, '/tmp',
                   CASE WHEN x > %(n)s - %(p)s THEN 'pending' ELSE 'completed' END, 0,
                   CASE WHEN x > %(n)s - %(p)s THEN 0 ELSE 1 END, 3, NULL,
                   %(now)s - %(span)s + x * %(step)s, %(now)s - %(span)s + x * %(step)s,
                   %(now)s - %(span)s + x * %(step)s + 0.01,
                   CASE WHEN x > %(n)s - %(p)s THEN NULL ELSE 0 END,
                   CASE WHEN x > %(n)s - %(p)s THEN NULL ELSE 'exit 0' END,
                   CASE WHEN x > %(n)s - %(p)s THEN 0 ELSE 1 END
            FROM generate_series(1, %(n)s) AS x""", params, conn)
        ctx.pg.sql("""
            INSERT INTO runs (job_id, run, attempt, worker_id, started_at, finished_at, exit_code,
                              outcome, result_state, stdout, stderr)
            SELECT id, 1, 1, 'bench:1:1', created_at, updated_at, 0, 'exit 0', 'completed', '', ''
            FROM jobs WHERE state = 'completed'""", None, conn)
        tables = {r[0] for r in ctx.pg.sql("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = current_schema()", None, conn)}
        if "count_base" in tables:
            # Counts kept as a base plus insert-only deltas: the base from the rows.
            ctx.pg.sql("DELETE FROM count_deltas", None, conn)
            ctx.pg.sql("DELETE FROM count_base", None, conn)
            ctx.pg.sql("INSERT INTO count_base (queue, state, n) "
                       "SELECT queue, state, count(*) FROM jobs GROUP BY queue, state", None, conn)
        else:
            ctx.note("PostgreSQL schema without count_base: its counts were not set from the rows")
        ctx.pg.sql("VACUUM ANALYZE jobs, runs", None, conn)
    finally:
        conn.close()


def section_postgres(ctx):
    """With --pg: pickup latency and idle CPU of a worker on PostgreSQL, then
    claim + finish with 1k and 1M jobs stored (alternating rounds, as in
    scale) and `status` on both. The drains run in the drain section's rounds."""
    if ctx.pg is None:
        return {"skipped": "no --pg URL"}
    res = {"server_version": ctx.pg.server_version()}
    d = ctx.tmp("pgpickup")
    db = ctx.pg.new_queue("pickup")
    ctx.q.enqueue(db, ["true"], d)
    w = RunningWorker(ctx, d, db)
    try:
        pickup_and_idle(ctx, d, db, w, res)
    finally:
        w.stop()
    ctx.pg.drop(db)
    claims = ctx.size["scale_claims"]
    dbs = {}
    for n in ctx.size["pg_scale_sizes"]:
        pending = claims + SCALE_WARM + 50 + n // 100
        dbs[n] = ctx.pg.new_queue("jobs%d" % n)
        t0 = time.perf_counter()
        build_pg_queue(ctx, dbs[n], n, pending)
        res["jobs_%d" % n] = {"jobs": n, "pending": pending, "build_s": round(time.perf_counter() - t0, 1)}
    for n, r in claim_costs(ctx, dbs, claims).items():
        res["jobs_%d" % n].update(r)
    timed = {(n, "status"): (ctx.q.cli(db, "status"), child_env()) for n, db in dbs.items()}
    for (n, k), v in timed_runs(timed, ctx.size["scale_cli_runs"], ctx.root).items():
        res["jobs_%d" % n]["%s_ms" % k] = v["median_ms"]
    for db in dbs.values():
        ctx.pg.drop(db)
    return res


###############################################################################
# task-spooler ##################################################################
###############################################################################

def tasks_tsp(ctx):
    # Debian installs task-spooler as `tsp` (moreutils' `ts` is another program).
    tsp = shutil.which("tsp")
    if tsp is None:
        return [], {"skipped": "task-spooler (tsp) is not installed (apt-get install task-spooler)"}
    n = ctx.size["tsp_jobs"]
    return [("slots_%d" % slots, lambda slots=slots: tsp_drain(ctx, tsp, n, slots))
            for slots in ctx.size["tsp_slots"]], None


#: task-spooler keeps each queued job as a waiting client connection, and
#: refuses more than about 1,000 of them; bigger workloads run in batches.
TSP_BATCH = 900


def tsp_drain(ctx, tsp, n, slots):
    """task-spooler: `slots` blocking jobs hold the slots while a batch of
    `sh -c true` jobs is queued (each a waiting client); then the blockers are
    released and we time until the batch's last job has finished. The time
    is the sum over batches. Output goes to files in TMPDIR, as tsp does by
    default (its way of capturing output)."""
    d = ctx.tmp("tsp%d" % slots)
    env = child_env(TS_SOCKET=os.path.join(d, "socket"), TMPDIR=d, TS_MAXFINISHED=str(TSP_BATCH + 100))
    env.pop("TS_SLOTS", None)
    env.pop("TS_MAXCONN", None)

    def tsp_run(*args, timeout=30):
        code, out, err, _ = PROCS.run([tsp] + list(args), timeout=timeout, cwd=d, env=env)
        if code != 0:
            raise BenchError("tsp %s exited %d: %s" % (" ".join(args)[:60], code, err.decode(errors="replace")))
        return out.decode(errors="replace")

    gates = []

    def release(gate):
        """Let the blockers waiting on a gate (a FIFO) go: open it for
        writing and close it, and their `read` sees end-of-file."""
        try:
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass        # ENXIO: nobody is waiting on it

    def kill_server():
        # Release every blocker first: `tsp -K` stops the server, not the jobs.
        for gate in gates:
            release(gate)
        subprocess.run([tsp, "-K"], env=env, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=10)
    PROCS.atexit.append(kill_server)
    batches = -(-n // TSP_BATCH)
    sizes = [n // batches + (1 if i < n % batches else 0) for i in range(batches)]
    secs = 0.0
    try:
        tsp_run("-S", str(slots))
        for b, size in enumerate(sizes):
            gate = os.path.join(d, "gate%d" % b)
            os.mkfifo(gate)
            gates.append(gate)
            tsp_run("-C")
            # Blockers hold the slots, waiting (without polling) to read the
            # gate; `timeout` bounds them should this process die.
            for _ in range(slots):
                tsp_run("timeout", "300", "sh", "-c", 'read x < "$0"', gate)
            if not wait_until(lambda: tsp_run("-l").count(" running ") == slots, 10, 0.01):
                raise BenchError("tsp: the %d blocking jobs did not start" % slots)
            # Queue the batch from one shell loop (a Python Popen per job would
            # make this set-up, which is not timed, the slowest part of the run).
            code, _, err, _ = PROCS.run(
                ["/bin/sh", "-c", 'i=0; while [ $i -lt %d ]; do "$0" -B sh -c true >/dev/null || exit 1; '
                 'i=$((i + 1)); done' % size, tsp], timeout=60 + size / 10, cwd=d, env=env)
            if code != 0:
                raise BenchError("queueing tsp jobs failed: %s" % err.decode(errors="replace")[-300:])
            queued = tsp_run("-l").count(" queued ")
            if queued != size:
                raise BenchError("tsp: %d of %d jobs queued" % (queued, size))
            t0 = time.perf_counter()
            release(gate)
            tsp_run("-w", timeout=60 + size / 10)
            # -w waits for the last job queued; with several slots another
            # may still be running.
            end = time.monotonic() + 30
            while True:
                listing = tsp_run("-l")
                if (" running " not in listing and " queued " not in listing) or time.monotonic() > end:
                    break
                time.sleep(0.001)
            secs += time.perf_counter() - t0
            finished = listing.count(" finished ")
            if finished != size + slots:
                raise BenchError("tsp: %d of %d jobs finished" % (finished, size + slots))
    finally:
        try:
            kill_server()
        finally:
            PROCS.atexit.remove(kill_server)
    shutil.rmtree(d, ignore_errors=True)
    return {"jobs": n, "slots": slots, "batches": batches, "seconds": round(secs, 4),
            "jobs_per_s": round(n / secs, 1)}


###############################################################################
# Dashboard ####################################################################
###############################################################################

class RunningDashboard:
    """`queuectl dashboard --port 0` in the background; requests carry its cookie."""

    def __init__(self, ctx, d, db):
        import select
        self.log = open(os.path.join(d, "dashboard.log"), "wb")
        t0 = time.perf_counter()
        self.proc = PROCS.popen(ctx.q.cli(db, "dashboard", "--port", "0"), cwd=d, env=child_env(),
                                stdout=subprocess.PIPE, stderr=self.log)
        line = b""
        while not line.endswith(b"\n"):
            if not select.select([self.proc.stdout], [], [], 30)[0]:
                raise BenchError("the dashboard printed no URL within 30 s")
            chunk = os.read(self.proc.stdout.fileno(), 1000)
            if not chunk:
                raise BenchError("the dashboard exited at start (%s)" % self.proc.wait())
            line += chunk
        self.url_ms = (time.perf_counter() - t0) * 1000
        url = line.decode().split("\n")[0]
        self.base, _, token = url.partition("/?token=")
        self.port = int(self.base.rsplit(":", 1)[1])
        self.cookie = "queuectl_%d=%s" % (self.port, token)
        import urllib.request
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        # /metrics answers once the run counters are read (every run, in the background).
        self.get("/metrics", timeout=120)
        self.ready_s = time.perf_counter() - t0

    def get(self, path, timeout=30):
        """GET path: (milliseconds, body). Raises BenchError unless 200."""
        import urllib.request
        req = urllib.request.Request(self.base + path, headers={"Cookie": self.cookie})
        t0 = time.perf_counter()
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                body = resp.read()
        except OSError as e:
            raise BenchError("dashboard GET %s: %s" % (path, e))
        return (time.perf_counter() - t0) * 1000, body

    def cpu_ticks(self):
        st = proc_stat(self.proc.pid)
        return st[1] if st else 0

    def stop(self):
        PROCS.stop(self.proc)
        self.proc.stdout.close()
        self.log.close()


class OpenPage:
    """What an open overview page does (as its script does): listen on /events and
    re-fetch the regions whose topics changed, one fetch per region at a time."""

    REGIONS = {"counts": "jobs", "workers": "workers jobs", "stats": "stats depth", "dead": "dlq"}

    def __init__(self, dash):
        import threading
        self.dash, self.fetches, self.stopped = dash, 0, False
        self.last = {}
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        import urllib.request
        req = urllib.request.Request(self.dash.base + "/events", headers={"Cookie": self.dash.cookie})
        marks = None
        try:
            with self.dash.opener.open(req, timeout=30) as stream:
                while not self.stopped:
                    line = stream.readline()
                    if not line:
                        return
                    if not line.startswith(b"data: "):
                        continue
                    new = json.loads(line[6:])
                    changed = {k for k in new if marks is None or new[k] != marks.get(k)}
                    marks = new
                    for region, topics in self.REGIONS.items():
                        # At most once a second per region, as the page's script does (a
                        # change within the second is fetched by its trailing timer; here
                        # by the next event, which is close enough for a CPU measure).
                        if changed & set(topics.split()) and time.monotonic() - self.last.get(region, 0) >= 1.0:
                            self.last[region] = time.monotonic()
                            self.dash.get("/?fragment=" + region)
                            self.fetches += 1
        except (OSError, BenchError, ValueError):
            pass

    def stop(self):
        self.stopped = True


def dashboard_db(ctx, d):
    """A copy of the scale section's database, 2% of its completed jobs made dead
    (five exit codes), so that the DLQ pages have work."""
    n = ctx.size["dash_jobs"]
    src = scale_db(ctx, n, ctx.size["scale_claims"] + 20 + 50 + n // 100)     # the scale section's (cached) one
    db = os.path.join(d, "queue.db")
    shutil.move(src, db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("""UPDATE jobs SET state = 'dead', exit_code = seq % 5 + 1, outcome = 'exit ' || (seq % 5 + 1)
                        WHERE seq % 50 = 7 AND state = 'completed'""")
        conn.execute("""UPDATE runs SET result_state = 'dead',
                            exit_code = (SELECT exit_code FROM jobs WHERE id = job_id),
                            outcome = (SELECT outcome FROM jobs WHERE id = job_id)
                        WHERE job_id IN (SELECT id FROM jobs WHERE state = 'dead')""")
        conn.execute("UPDATE counts SET n = (SELECT count(*) FROM jobs WHERE jobs.state = counts.state)")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        mid = conn.execute("SELECT id, seq FROM jobs WHERE seq = ?", (n // 2,)).fetchone()
    finally:
        conn.close()
    return db, mid


def section_dashboard(ctx):
    """Page and API latency with ctx.size['dash_jobs'] jobs; CPU of an open page
    on an idle queue; a drain with and without an open page."""
    res = {}
    d = ctx.tmp("dashboard")
    db, (mid_id, mid_seq) = dashboard_db(ctx, d)
    dash = RunningDashboard(ctx, d, db)
    try:
        res["jobs"] = ctx.size["dash_jobs"]
        res["startup_url_ms"] = round(dash.url_ms, 1)
        res["startup_ready_s"] = round(dash.ready_s, 2)
        paths = ["/", "/?fragment=counts", "/?fragment=stats", "/jobs", "/jobs?state=dead", "/jobs?state=pending",
                 "/jobs?before=%d" % mid_seq, "/jobs?q=echo%%20%d" % (mid_seq - 1), "/jobs?q=no-such-text",
                 "/jobs?q=" + mid_id, "/jobs/" + mid_id, "/dlq", "/dlq?fragment=list",
                 "/dlq?g=1&outcome=exit+3&exit=3", "/confirm/retry", "/confirm/retry?g=1&outcome=exit+3&exit=3",
                 "/api/status", "/api/jobs", "/api/jobs?state=dead&limit=500", "/api/jobs/" + mid_id,
                 "/api/stats", "/api/dlq", "/metrics", "/healthz"]
        pages = {}
        for path in paths:
            dash.get(path)      # warm: the first call of a kind may fill a cache
        for _ in range(ctx.size["dash_requests"]):
            for path in paths:
                pages.setdefault(path, []).append(dash.get(path)[0])
        res["pages_ms"] = {p: {"median": round(median(v), 2), "max": round(max(v), 2)} for p, v in pages.items()}
        res["worst_median_ms"] = max(v["median"] for v in res["pages_ms"].values())
        res["worst_max_ms"] = max(v["max"] for v in res["pages_ms"].values())
    finally:
        dash.stop()
    shutil.rmtree(d, ignore_errors=True)

    # An open page on an idle queue (with an idle worker, whose heartbeats are writes).
    d = ctx.tmp("dashboard-idle")
    db = os.path.join(d, "queue.db")
    ctx.q.enqueue(db, ["true"], d)
    worker = RunningWorker(ctx, d, db)
    dash = RunningDashboard(ctx, d, db)
    try:
        page = OpenPage(dash)
        time.sleep(1.0)
        secs = ctx.size["dash_idle_seconds"]
        t0, c0 = time.perf_counter(), dash.cpu_ticks()
        f0 = page.fetches
        time.sleep(secs)
        ticks, wall = dash.cpu_ticks() - c0, time.perf_counter() - t0
        res["idle_page"] = {"seconds": round(wall, 1), "cpu_percent": round(ticks / CLK_TCK / wall * 100, 3),
                            "fetches_per_min": round((page.fetches - f0) / wall * 60, 1)}
        page.stop()
    finally:
        dash.stop()
        worker.stop()
    shutil.rmtree(d, ignore_errors=True)

    # A drain of `true` jobs on 2 workers, with and without an open page, alternating.
    n = ctx.size["dash_drain_jobs"]
    runs = {"without": [], "with": []}
    cpu = []
    for _ in range(ctx.repeat):
        for variant in ("without", "with"):
            d = ctx.tmp("dashboard-drain")
            db = os.path.join(d, "queue.db")
            ctx.q.enqueue(db, ["true"] * n, d)
            dash = page = None
            if variant == "with":
                dash = RunningDashboard(ctx, d, db)
                page = OpenPage(dash)
                c0 = dash.cpu_ticks()
            try:
                code, _, _, secs = PROCS.run(ctx.q.cli(db, "worker", "start", "--once", "--count", 2),
                                             timeout=60 + n * 0.5, cwd=d, env=child_env())
                if code != 0 or ctx.q.counts(db)["completed"] != n:
                    raise BenchError("dashboard drain (%s page) exited %s" % (variant, code))
                runs[variant].append(n / secs)
                if dash is not None:
                    cpu.append((dash.cpu_ticks() - c0) / CLK_TCK / secs * 100)
            finally:
                if page is not None:
                    page.stop()
                if dash is not None:
                    dash.stop()
            shutil.rmtree(d, ignore_errors=True)
    res["drain"] = {"jobs": n, "without_jobs_per_s": round(max(runs["without"]), 1),
                    "with_jobs_per_s": round(max(runs["with"]), 1),
                    "all_without": [round(x, 1) for x in runs["without"]],
                    "all_with": [round(x, 1) for x in runs["with"]],
                    "dashboard_cpu_percent": round(median(cpu), 2)}
    return res


###############################################################################
# Targets ######################################################################
###############################################################################

def get(res, *path):
    for k in path:
        if not isinstance(res, dict) or k not in res:
            return None
        res = res[k]
    return res


def targets(res):
    """[(name, measured, requirement, passed or None)] for the issue's targets."""
    out = []

    def ratio(name, a, b, op, bound, fmt="%.2f", why=""):
        if a is None or b is None or not b:
            out.append((name, "n/a", why or "not measured", None))
            return
        r = a / b
        ok = r >= bound if op == ">=" else r <= bound
        out.append((name, (fmt % r) + "x", "%s %gx" % (op, bound), ok))

    def bound(name, v, op, b, unit, fmt="%.2f"):
        if v is None:
            out.append((name, "n/a", "not measured", None))
            return
        ok = v >= b if op == ">=" else (v <= b if op == "<=" else v < b)
        out.append((name, (fmt % v) + unit, "%s %g%s" % (op, b, unit), ok))

    d2 = get(res, "drain", "workers_2", "jobs_per_s")
    for key in sorted(k for k in (res.get("drain") or {}) if k.startswith("baseline_")):
        w = key.rsplit("_", 1)[1]
        ratio("drain %s worker%s / baseline queuectl (--baseline)" % (w, "" if w == "1" else "s"),
              get(res, "drain", "workers_" + w, "jobs_per_s"), get(res, "drain", key, "jobs_per_s"), ">=", 0.95)
        mine, base = get(res, "drain", "workers_" + w, "all_jobs_per_s"), get(res, "drain", key, "all_jobs_per_s")
        if mine and base:
            # Not a target: on a busy machine the median of the rounds moves less than the best.
            out.append(("  (info) same, median of the rounds", "%.2fx" % (median(mine) / median(base)),
                        "%.0f / %.0f jobs/s" % (median(mine), median(base)), None))
    ratio("drain 2 workers / minimal loop 2 procs", d2, get(res, "limit", "queue_2p", "jobs_per_s"), ">=", 0.8)
    c_loop, c_drain = get(res, "limit", "queue_2p", "cpu_ms_per_job"), get(res, "drain", "workers_2", "cpu_ms_per_job")
    if c_loop and c_drain:
        # Not a target: the same comparison in CPU time, which load from
        # other processes on the machine disturbs far less than wall time.
        out.append(("  (info) CPU per job, minimal loop / drain", "%.2fx" % (c_loop / c_drain),
                    "%.2f / %.2f ms" % (c_loop, c_drain), None))
    tsp2 = get(res, "tsp", "slots_2", "jobs_per_s")
    if get(res, "tsp", "skipped"):
        out.append(("drain 2 workers / task-spooler 2 slots", "skipped", res["tsp"]["skipped"], None))
    else:
        ratio("drain 2 workers / task-spooler 2 slots", d2, tsp2, ">=", 1.0)
    bound("sleep 0.05 x4 workers: parallel efficiency", get(res, "sleep", "sleep", "efficiency"), ">=", 0.9, "")
    enq = get(res, "enqueue")
    ratio("enqueue (installed by copying) / python3 -c 'import sqlite3'", get(enq, "enqueue", "median_ms"),
          get(enq, "floor", "median_ms"), "<=", 1.3)
    ratio("  same, installed by pip", get(enq, "enqueue_pip", "median_ms"),
          get(enq, "floor", "median_ms"), "<=", 1.2)
    if get(enq, "enqueue_nosite"):
        ratio("  same, both with -S (no site hooks)", get(enq, "enqueue_nosite", "median_ms"),
              get(enq, "floor_nosite", "median_ms"), "<=", 1.3)
    ratio("  same, as python3 queuectl.py (script)", get(enq, "enqueue_script", "median_ms"),
          get(enq, "floor", "median_ms"), "<=", 1.3)
    mp = get(enq, "imports", "multiprocessing")
    out.append(("enqueue does not import multiprocessing", "n/a" if mp is None else
                ("imports it" if mp else "not imported"), "not imported", None if mp is None else not mp))
    bound("bulk enqueue --file", get(res, "bulk", "bulk", "jobs_per_s"), ">=", 50000, " jobs/s", "%.0f")
    bound("pickup latency p50", get(res, "pickup", "pickup", "p50_ms"), "<=", 3, " ms", "%.1f")
    bound("pickup latency p95", get(res, "pickup", "pickup", "p95_ms"), "<=", 10, " ms", "%.1f")
    bound("idle worker CPU", get(res, "pickup", "idle_cpu", "cpu_percent"), "<=", 0.1, "%", "%.3f")
    sizes = sorted(int(k.split("_")[1]) for k in (res.get("scale") or {}) if k.startswith("jobs_"))
    if len(sizes) >= 2:
        lo, hi = "jobs_%d" % sizes[0], "jobs_%d" % sizes[-1]
        tag = "%s vs %s jobs" % (human(sizes[-1]), human(sizes[0]))
        ratio("claim+finish cost, " + tag, get(res, "scale", hi, "claim_finish_us"),
              get(res, "scale", lo, "claim_finish_us"), "<=", 1.5)
        ratio("status time, " + tag, get(res, "scale", hi, "status_ms"), get(res, "scale", lo, "status_ms"),
              "<=", 1.5)
        v = get(res, "scale", hi, "status_ms")
        bound("status at %s jobs" % human(sizes[-1]), None if v is None else v / 1000.0, "<", 0.5, " s", "%.3f")
    else:
        out.append(("scale targets", "n/a", "not measured", None))
    for kind in WAITING_KINDS:
        ws = sorted(int(k.rsplit("_", 1)[1]) for k in (res.get("scale") or {})
                    if k.startswith("waiting_%s_" % kind))
        if len(ws) < 2:
            continue
        lo, hi = "waiting_%s_%d" % (kind, ws[0]), "waiting_%s_%d" % (kind, ws[-1])
        tag = "beside %s vs %s %s jobs" % (human(ws[-1]), human(ws[0]), kind)
        if kind != "queues20":
            ratio("drain of due jobs, " + tag, get(res, "scale", hi, "drain_s"), get(res, "scale", lo, "drain_s"),
                  "<=", 1.5)
        ratio("  claim+finish, " + tag, get(res, "scale", hi, "claim_finish_us"),
              get(res, "scale", lo, "claim_finish_us"), "<=", 1.5)
        for cmd in ("status", "list"):
            v = get(res, "scale", hi, "%s_ms" % cmd)
            bound("%s beside %s %s jobs" % (cmd, human(ws[-1]), kind), None if v is None else v / 1000.0,
                  "<", 0.5, " s", "%.3f")
    if get(res, "dashboard"):
        tag = human(get(res, "dashboard", "jobs"))
        bound("dashboard: slowest page/API median, %s jobs" % tag, get(res, "dashboard", "worst_median_ms"),
              "<=", 100, " ms", "%.1f")
        bound("  same, slowest single call", get(res, "dashboard", "worst_max_ms"), "<=", 100, " ms", "%.1f")
        bound("dashboard: CPU with a page open, idle queue", get(res, "dashboard", "idle_page", "cpu_percent"),
              "<=", 1, "%", "%.2f")
        ratio("drain 2 workers with a dashboard page open / without", get(res, "dashboard", "drain", "with_jobs_per_s"),
              get(res, "dashboard", "drain", "without_jobs_per_s"), ">=", 0.95)
    if get(res, "postgres") and not get(res, "postgres", "skipped"):
        for key in sorted(k for k in (res.get("drain") or {}) if k.startswith("pg_workers_")):
            w = key.rsplit("_", 1)[1]
            ratio("PostgreSQL: drain %s workers / SQLite" % w, get(res, "drain", key, "jobs_per_s"),
                  get(res, "drain", "workers_" + w, "jobs_per_s"), ">=", 0.7)
        bound("PostgreSQL: pickup latency p50", get(res, "postgres", "pickup", "p50_ms"), "<=", 20, " ms", "%.1f")
        bound("PostgreSQL: pickup latency p95", get(res, "postgres", "pickup", "p95_ms"), "<=", 50, " ms", "%.1f")
        bound("PostgreSQL: idle worker CPU", get(res, "postgres", "idle_cpu", "cpu_percent"), "<", 1, "%", "%.2f")
        pg_sizes = sorted(int(k.split("_")[1]) for k in res["postgres"] if k.startswith("jobs_"))
        if len(pg_sizes) >= 2:
            lo, hi = "jobs_%d" % pg_sizes[0], "jobs_%d" % pg_sizes[-1]
            ratio("PostgreSQL: claim+finish cost, %s vs %s jobs" % (human(pg_sizes[-1]), human(pg_sizes[0])),
                  get(res, "postgres", hi, "claim_finish_us"), get(res, "postgres", lo, "claim_finish_us"), "<=", 1.5)
            v = get(res, "postgres", hi, "status_ms")
            bound("PostgreSQL: status at %s jobs" % human(pg_sizes[-1]), None if v is None else v / 1000.0,
                  "<", 0.5, " s", "%.3f")
    bound("worker peak RSS idle", get(res, "pickup", "memory", "worker_idle_mb"), "<", 25, " MB", "%.1f")
    bound("worker RSS growth while a job prints %s" % human_bytes(get(res, "pickup", "memory", "output_bytes")),
          get(res, "pickup", "memory", "growth_mb"), "<=", 5, " MB", "%.1f")
    return out


def human(n):
    if n >= 1000000 and n % 1000000 == 0:
        return "%dM" % (n // 1000000)
    if n >= 1000 and n % 1000 == 0:
        return "%dk" % (n // 1000)
    return str(n)


def human_bytes(n):
    if n is None:
        return "?"
    return "%g MB" % (n / 1e6)


###############################################################################
# Report #######################################################################
###############################################################################

def table(rows, headers):
    widths = [len(h) for h in headers]
    rows = [[str(c) for c in r] for r in rows]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def result_rows(res, size):
    rows = []

    def add(section, what, value, note=""):
        if value is not None:
            rows.append((section, what, value, note))

    def jps(r):
        if not r:
            return None
        s = "%.0f jobs/s" % r["jobs_per_s"]
        return s

    def spread(r):
        if not r:
            return ""
        parts = []
        if r.get("seconds") is not None:
            parts.append("%.2f s" % r["seconds"])
        if r.get("cpu_ms_per_job") is not None:
            parts.append("CPU %.2f ms/job" % r["cpu_ms_per_job"])
        if r.get("server_cpu_ms_per_job") is not None:
            parts.append("server %.2f" % r["server_cpu_ms_per_job"])
        if r.get("all_jobs_per_s"):
            parts.append("runs " + "/".join("%.0f" % x for x in r["all_jobs_per_s"]))
        if r.get("batches", 1) > 1:
            parts.append("%d batches" % r["batches"])
        if r.get("startup_s") is not None:
            parts.append("start %.2f s, run %.2f ms + gap %.2f ms, exit %.2f s" % (
                r["startup_s"], r["run_ms"], r["gap_ms"] or 0, r["shutdown_s"]))
        return "; ".join(parts)

    L = res.get("limit") or {}
    for k, label in (("spawn_1p", "sh -c true, 1 process"), ("spawn_2p", "sh -c true, 2 processes"),
                     ("queue_1p", "claim/run/complete loop, 1 process"),
                     ("queue_2p", "claim/run/complete loop, 2 processes")):
        add("limit", label, jps(L.get(k)), spread(L.get(k)))
    D = res.get("drain") or {}
    for w in size["drain_workers"]:
        r = D.get("workers_%d" % w)
        add("drain", "%d true jobs, %d worker%s" % (size["drain_jobs"], w, "" if w == 1 else "s"), jps(r),
            spread(r))
        r = D.get("baseline_workers_%d" % w)
        add("drain", "  same, baseline queuectl", jps(r), spread(r))
    for w in size["pg_drain_workers"]:
        r = D.get("pg_workers_%d" % w)
        add("drain", "%d true jobs, %d workers, PostgreSQL" % (size["drain_jobs"], w), jps(r), spread(r))
    T = res.get("tsp") or {}
    if T.get("skipped"):
        add("tsp", "task-spooler", "skipped", T["skipped"])
    for s in size["tsp_slots"]:
        r = T.get("slots_%d" % s)
        add("tsp", "%d jobs, %d slot%s" % (size["tsp_jobs"], s, "" if s == 1 else "s"), jps(r), spread(r))
    S = get(res, "sleep", "sleep")
    if S:
        add("sleep", "%d x sleep %g, %d workers" % (size["sleep_jobs"], size["sleep_seconds"], size["sleep_workers"]),
            "%.2f s" % S["seconds"], "ideal %.2f s, efficiency %.0f%%; one `sh -c 'sleep %g'` alone %.1f ms "
            "(efficiency against that: %.0f%%); %s" % (
                S["ideal_seconds"], S["efficiency"] * 100, size["sleep_seconds"], S["command_alone_ms"],
                S["efficiency_vs_command"] * 100, spread(S)))
    E = res.get("enqueue") or {}
    for k, label in (("floor", "python3 -c 'import sqlite3' (the floor)"),
                     ("enqueue", "queuectl enqueue -- true (installed by copying)"),
                     ("enqueue_pip", "queuectl enqueue -- true (installed by pip)"),
                     ("enqueue_script", "python3 queuectl.py enqueue -- true"),
                     ("floor_nosite", "python3 -S -c 'import sqlite3'"),
                     ("enqueue_nosite", "python3 -S queuectl enqueue (installed)")):
        if k in E:
            add("enqueue", label, "%.1f ms" % E[k]["median_ms"], "median of %d, min %.1f" % (E[k]["runs"], E[k]["min_ms"]))
    if "compile_script_ms" in E:
        add("enqueue", "compiling queuectl.py (each script run)", "%.1f ms" % E["compile_script_ms"])
    if "commit_full_ms" in E:
        add("enqueue", "enqueue transaction in-process, FULL", "%.2f ms" % E["commit_full_ms"],
            "NORMAL %.2f ms (the difference is the fsync)" % E["commit_normal_ms"])
    if E.get("imports"):
        top = E["imports"]["extra_top_level_ms"]
        add("enqueue", "imports beyond the floor (-S)", "%d modules" % len(E["imports"]["extra_modules"]),
            ", ".join("%s %.1fms" % kv for kv in list(top.items())[:5]))
    B = get(res, "bulk", "bulk")
    if B:
        add("enqueue", "enqueue --file, %d JSON Lines jobs" % B["jobs"], jps(B), "%.2f s" % B["seconds"])
    P = res.get("pickup") or {}
    if P.get("pickup"):
        p = P["pickup"]
        add("pickup", "enqueue -> job starts, p50", "%.1f ms" % p["p50_ms"], "%d samples" % p["samples"])
        add("pickup", "enqueue -> job starts, p95", "%.1f ms" % p["p95_ms"], "min %.1f, max %.1f" % (p["min_ms"], p["max_ms"]))
    if P.get("idle_cpu"):
        c = P["idle_cpu"]
        add("pickup", "idle supervisor+worker CPU", "%.3f %%" % c["cpu_percent"],
            "worker %.2f%%, supervisor %.2f%%, over %.1f s (tick %g ms)" % (
                c["worker_percent"], c["supervisor_percent"], c["seconds"], c["tick_ms"]))
    if P.get("memory"):
        m = P["memory"]
        add("memory", "worker peak RSS, idle", "%.1f MB" % m["worker_idle_mb"],
            "supervisor %.1f MB; run as python3 queuectl.py: %s MB (the script's syntax tree stays)" % (
                m["supervisor_mb"], m.get("worker_idle_script_mb", "?")))
        add("memory", "worker peak RSS after a job printed %s" % human_bytes(m["output_bytes"]),
            "%.1f MB" % m["worker_after_mb"], "growth %.1f MB; %d bytes kept" % (m["growth_mb"], m["stdout_kept_bytes"]))
    scale = res.get("scale") or {}
    for k, r in sorted(((k, r) for k, r in scale.items() if k.startswith("waiting_")),
                       key=lambda kv: (kv[1]["kind"], kv[1]["jobs"])):
        tag = "beside %s %s jobs" % (human(r["jobs"]), r["kind"])
        if r.get("drain_s") is None:
            add("scale", "claim+finish, %s" % tag, "%.0f us" % r["claim_finish_us"])
        else:
            add("scale", "drain %d due jobs, %s" % (r["due"], tag), "%.2f s" % r["drain_s"],
                "claim+finish %.0f us" % r["claim_finish_us"])
        add("scale", "status / list --limit 20, " + tag, "%.1f / %.1f ms" % (r["status_ms"], r["list_ms"]))
    for k, r in sorted(((k, r) for k, r in scale.items() if k.startswith("jobs_")),
                       key=lambda kv: int(kv[0].split("_")[1])):
        tag = "%s jobs" % human(r["jobs"])
        add("scale", "claim+finish, " + tag, "%.0f us" % r["claim_finish_us"], "idle poll %.0f us" % r["idle_poll_us"])
        add("scale", "status, " + tag, "%.1f ms" % r["status_ms"], "db %.0f MB" % r["db_mb"])
        add("scale", "list --limit 20, " + tag, "%.1f ms" % r["list_ms"])
        add("scale", "stats, " + tag, "%.1f ms" % r["stats_ms"], "(not a target)")
    G = res.get("postgres") or {}
    if G.get("skipped"):
        add("postgres", "PostgreSQL", "skipped", G["skipped"])
    if G.get("pickup"):
        p = G["pickup"]
        add("postgres", "enqueue -> job starts, p50 / p95", "%.1f / %.1f ms" % (p["p50_ms"], p["p95_ms"]),
            "PostgreSQL %s; %d samples, max %.1f" % (G["server_version"], p["samples"], p["max_ms"]))
    if G.get("idle_cpu"):
        add("postgres", "idle supervisor+worker CPU", "%.2f %%" % G["idle_cpu"]["cpu_percent"],
            "over %.1f s" % G["idle_cpu"]["seconds"])
    for k, r in sorted(((k, r) for k, r in G.items() if k.startswith("jobs_")), key=lambda kv: int(kv[0].split("_")[1])):
        tag = "%s jobs" % human(r["jobs"])
        add("postgres", "claim+finish, " + tag, "%.0f us" % r["claim_finish_us"], "built in %.1f s" % r["build_s"])
        add("postgres", "status, " + tag, "%.1f ms" % r["status_ms"])
    D = res.get("dashboard")
    if D:
        tag = human(D["jobs"])
        add("dashboard", "start: URL printed / run counters read, " + tag, "%.0f ms" % D["startup_url_ms"],
            "%.1f s" % D["startup_ready_s"])
        for path, v in D["pages_ms"].items():
            add("dashboard", "GET %s" % path, "%.1f ms" % v["median"], "max %.1f ms" % v["max"])
        add("dashboard", "CPU, a page open on an idle queue", "%.2f %%" % D["idle_page"]["cpu_percent"],
            "over %.0f s, %.1f fetches/min" % (D["idle_page"]["seconds"], D["idle_page"]["fetches_per_min"]))
        dr = D["drain"]
        add("dashboard", "drain %d true, 2 workers, without / with a page open" % dr["jobs"],
            "%.0f / %.0f jobs/s" % (dr["without_jobs_per_s"], dr["with_jobs_per_s"]),
            "dashboard CPU %.1f%% meanwhile" % dr["dashboard_cpu_percent"])
    return rows


###############################################################################
# Main #########################################################################
###############################################################################

class Context:
    def __init__(self, q, size, repeat, root):
        self.q, self.size, self.repeat, self.root = q, size, repeat, root
        self.notes = []
        self.baseline = None        # --baseline: another queuectl to compare drains with
        self.pg = None              # --pg: a PgServer
        self._n = 0

    def tmp(self, name):
        self._n += 1
        d = os.path.join(self.root, "%02d-%s" % (self._n, name))
        os.makedirs(d)
        return d

    def note(self, text):
        self.notes.append(text)
        sys.stderr.write("bench: %s\n" % text)


def machine_info(q):
    info = {"python": platform.python_version(), "executable": PY, "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "queuectl": getattr(q.mod, "__version__", "?"), "queuectl_path": q.path}
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_start"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(q.path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, timeout=5).stdout.decode().strip()
        info["git"] = out or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark queuectl (see the module docstring).")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, under ~20 s (for the test suite)")
    ap.add_argument("--json", metavar="PATH", default="bench-results.json", help="where to write the results")
    ap.add_argument("--only", metavar="LIST", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--repeat", type=int, help="rounds of the throughput measurements; the best run of each counts "
                    "(default 3, 1 with --quick)")
    ap.add_argument("--queuectl", metavar="PATH", default=os.path.join(HERE, "queuectl.py"))
    ap.add_argument("--baseline", metavar="PATH",
                    help="another queuectl.py (e.g. `git show main:queuectl.py > /tmp/base.py`) whose drains "
                         "run in the same rounds, for a ratio from one run")
    ap.add_argument("--pg", metavar="URL", help="also measure PostgreSQL on this server (a database where "
                    "bench.py may create and drop schemas), beside SQLite in the same run")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    size = QUICK if args.quick else FULL
    only = SECTIONS
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in SECTIONS]
        if bad:
            ap.error("unknown section %s (valid: %s)" % (", ".join(bad), ", ".join(SECTIONS)))
    repeat = max(1, args.repeat or size["repeat"])
    q = Q(args.queuectl)
    root = tempfile.mkdtemp(prefix="queuectl-bench-")
    ctx = Context(q, size, repeat, root)
    ctx.baseline = Q(args.baseline, "queuectl_bench_baseline") if args.baseline else None
    if args.pg is not None and not is_postgres_url(args.pg):
        ap.error("--pg takes a postgresql:// URL")
    ctx.pg = PgServer(args.pg) if args.pg else None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    atexit.register(PROCS.cleanup)

    started = time.time()
    results, errors, timings = {}, {}, {}
    # Throughput sections run in rounds, every measurement once per round, so
    # that load from elsewhere on the machine (a busy CI box) hits the queue
    # and its references alike; the best run of each counts.
    builders = {"limit": tasks_limit, "drain": tasks_drain, "sleep": tasks_sleep, "tsp": tasks_tsp}
    funcs = {"enqueue": section_enqueue, "bulk": section_bulk, "pickup": section_pickup,
             "scale": section_scale, "dashboard": section_dashboard, "postgres": section_postgres}

    def attempt(name, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except BenchError as e:
            errors[name] = str(e)
            sys.stderr.write("bench: %s FAILED: %s\n" % (name, e))
        except Exception as e:      # a bug here or an API change in queuectl: report, go on
            import traceback
            errors[name] = "%s: %s" % (type(e).__name__, e)
            sys.stderr.write("bench: %s FAILED:\n%s" % (name, traceback.format_exc()))
        finally:
            PROCS.cleanup()
            timings[name] = round(timings.get(name, 0) + time.perf_counter() - t0, 2)
        return None

    try:
        tasks, finishers, runs = [], {}, {}
        for name in ("limit", "drain", "sleep", "tsp"):
            if name in only:
                built = attempt(name, lambda: builders[name](ctx))
                if built is None:
                    continue
                section_tasks, extra = built
                if isinstance(extra, dict):
                    results[name] = extra
                elif extra is not None:
                    finishers[name] = extra
                tasks += [(name, key, fn) for key, fn in section_tasks]
        for r in range(repeat):
            for name, key, fn in tasks:
                if name in errors:
                    continue
                sys.stderr.write("bench: %s %s (round %d of %d) ...\n" % (name, key, r + 1, repeat))
                sys.stderr.flush()
                out = attempt(name, fn)
                if out is not None:
                    runs.setdefault((name, key), []).append(out)
        for (name, key), rs in runs.items():
            if name not in errors:
                results.setdefault(name, {})[key] = best(rs)
        for name, fn in finishers.items():
            if name in results and name not in errors:
                attempt(name, lambda: fn(results[name]))
        for name in SECTIONS:
            if name in only and name in funcs:
                sys.stderr.write("bench: %s ...\n" % name)
                sys.stderr.flush()
                out = attempt(name, lambda: funcs[name](ctx))
                if out is not None:
                    results[name] = out
    finally:
        PROCS.cleanup()
        if ctx.pg is not None:
            ctx.pg.close()
        if args.keep:
            sys.stderr.write("bench: kept %s\n" % root)
        else:
            # A daemon's clients (task-spooler's) may still write into it for
            # a moment after their server was killed.
            for _ in range(10):
                shutil.rmtree(root, ignore_errors=True)
                if not os.path.exists(root):
                    break
                time.sleep(0.1)

    checks = targets(results)
    info = machine_info(q)
    print("queuectl benchmark%s: Python %s, SQLite %s, %s CPUs, load %s, %s" % (
        " (--quick: sizes too small for the targets to mean much)" if args.quick else "",
        info["python"], info["sqlite"], info["cpus"], " ".join(info.get("loadavg_start", [])),
        time.strftime("%Y-%m-%d %H:%M")))
    print()
    print(table(result_rows(results, size), ("SECTION", "MEASURE", "VALUE", "NOTE")))
    print()
    print(table([(n, m, r, "PASS" if ok else ("FAIL" if ok is False else "-")) for n, m, r, ok in checks],
                ("TARGET", "MEASURED", "REQUIRED", "RESULT")))
    for name, err in errors.items():
        print("ERROR in %s: %s" % (name, err))
    for note in ctx.notes:
        print("note: " + note)
    total = time.time() - started
    print("\n%d of %d targets pass; total time %.0f s" % (
        sum(1 for c in checks if c[3]), sum(1 for c in checks if c[3] is not None), total))

    doc = {
        "meta": dict(info, quick=args.quick, repeat=repeat, sizes={k: v for k, v in size.items()},
                     started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                     seconds=round(total, 1), section_seconds=timings, notes=ctx.notes),
        "results": results,
        "errors": errors,
        "targets": [{"name": n, "measured": m, "required": r, "pass": ok} for n, m, r, ok in checks],
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    if errors:
        return 1
    if args.strict and any(c[3] is False for c in checks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
