#!/usr/bin/env bash
# The PostgreSQL half of CI: a throwaway server and a Python that has a driver.
#
#   .ci/postgres.sh start DIR   start a new cluster in DIR (made here; must not
#                               exist) on 127.0.0.1 and a free port; print its
#                               URL (postgresql://postgres@127.0.0.1:PORT/queuectl_ci)
#   .ci/postgres.sh stop DIR    stop that cluster and delete DIR
#   .ci/postgres.sh venv PYTHON print the python3 of a venv made from PYTHON that
#                               has psycopg 3 (cached in ~/.cache/queuectl-ci/venv-pg)
#
# Only stdout carries the answer; progress and errors go to stderr. `start`
# installs Debian's postgresql when no initdb is found (needs root). The
# cluster never listens on 5432 unless that port happens to be the free one it
# picked, and never touches a server that runs on this machine already: its
# own data directory, its own port, its Unix socket in DIR, trust auth for
# 127.0.0.1 only. fsync is off: the data is thrown away at the end.
#
# initdb refuses to run as root, so as root the cluster belongs to the
# `postgres` user (runuser); DIR and its parents must be traversable by it,
# which is why `start` is given a directory under /tmp, not under $HOME.
set -euo pipefail

say() { echo "ci-postgres: $*" >&2; }
die() { say "$*"; exit 1; }

pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$bin" ] && [ -x "$bin/initdb" ] && echo "$bin"
}

install_postgresql() {
    [ "$(id -u)" -eq 0 ] || die "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin) and not root: install Debian's postgresql"
    say "installing Debian's postgresql (server binaries for a throwaway cluster)"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's package starts its own cluster on 5432; CI wants only its own,
    # so policy-rc.d keeps the service from starting during the install.
    local policy=/usr/sbin/policy-rc.d had_policy=1
    [ -e "$policy" ] || { had_policy=0; printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; }
    local ok=0
    apt-get install -y -qq postgresql >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; } || ok=1
    [ "$had_policy" = 1 ] || rm -f "$policy"
    [ "$ok" = 0 ] || die "apt-get install postgresql failed"
}

# as_owner CMD...: run CMD as the cluster's owner (postgres when we are root).
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 bin port tries
    [ ! -e "$dir" ] || die "$dir exists already"
    bin=$(pg_bin) || { install_postgresql; bin=$(pg_bin) || die "no initdb after installing postgresql"; }
    mkdir -m 755 "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' user to own the cluster (initdb refuses root)"
        chown postgres: "$dir"
        as_owner test -x "$dir" || die "$dir is not reachable by the postgres user (a parent directory is private)"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    for tries in 1 2 3 4 5; do
        port=$(free_port)
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
                -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null 2>&1; then
            echo "$port" >"$dir/port"
            as_owner "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres \
                -c "CREATE DATABASE queuectl_ci" >&2 || die "could not create database queuectl_ci"
            say "PostgreSQL $("$bin/postgres" -V | awk '{print $3}') on 127.0.0.1:$port (data in $dir)"
            echo "postgresql://postgres@127.0.0.1:$port/queuectl_ci"
            return 0
        fi
        say "could not start on port $port (attempt $tries); log:"; tail -n 5 "$dir/log" >&2 || true
    done
    die "could not start a PostgreSQL cluster"
}

stop() {
    local dir=$1 bin
    [ -d "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ] && bin=$(pg_bin); then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 ||
            say "pg_ctl stop failed (log: $dir/log)"
    fi
    rm -rf "$dir"
}

# sql DIR SQL: one query against the cluster in DIR, unaligned output.
sql() {
    local dir=$1 bin
    bin=$(pg_bin) || die "no PostgreSQL binaries"
    as_owner "$bin/psql" -X -q -A -t -h "$dir" -p "$(cat "$dir/port")" -U postgres -d postgres -c "$2"
}

venv() {
    local python=$1 cache=${QUEUECTL_CI_CACHE:-$HOME/.cache/queuectl-ci} dir
    dir=$cache/venv-pg
    # Reuse the cached venv if it still runs, is made from this Python and imports psycopg.
    if [ -x "$dir/bin/python3" ] &&
        [ "$("$dir/bin/python3" -c 'import sys; print(sys._base_executable)' 2>/dev/null)" = "$python" ] &&
        "$dir/bin/python3" -c 'import psycopg' 2>/dev/null; then
        echo "$dir/bin/python3"
        return 0
    fi
    say "making $dir with psycopg 3 (from $python)"
    rm -rf "$dir"
    mkdir -p "$cache"
    "$python" -m venv "$dir" >&2 || die "could not make a venv with $python"
    "$dir/bin/python3" -m pip install -q 'psycopg[binary]>=3.1,<4' >&2 ||
        { rm -rf "$dir"; die "could not install psycopg[binary] into $dir"; }
    "$dir/bin/python3" -c 'import psycopg' || { rm -rf "$dir"; die "psycopg does not import in $dir"; }
    echo "$dir/bin/python3"
}

case "${1:-}" in
start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
sql) [ $# -eq 3 ] || die "usage: $0 sql DIR SQL"; sql "$2" "$3" ;;
venv) [ $# -eq 2 ] || die "usage: $0 venv PYTHON"; venv "$2" ;;
*) die "usage: $0 start DIR | stop DIR | sql DIR SQL | venv PYTHON" ;;
esac
