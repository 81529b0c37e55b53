#!/usr/bin/env bash
# Build an old SQLite as a shared library, for running the test suite against
# it with LD_PRELOAD:
#
#   LD_PRELOAD=$(bash .ci/build-sqlite.sh 3.24.0) python -m pytest ...
#
# Prints the absolute path of the built libsqlite3.so.0 on stdout (nothing
# else); progress and errors go to stderr.  `--list` prints the versions known.
#
# The library is cached outside the repo, in
#   ${QUEUECTL_SQLITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/queuectl-sqlite}/VERSION/
# and a cached build is reused without touching the network, npm or gcc.
#
# Source: the only registries reachable from CI are PyPI, Debian and npm.  Older
# releases of the npm package `sqlite3` (node-sqlite3) ship SQLite's upstream
# amalgamation tarball as deps/sqlite-autoconf-NNNNNNN.tar.gz, so we `npm pack`
# the release that carries the wanted version (npm checks the registry's
# integrity hash) and also pin the sha256 of the inner tarball.  Those inner
# tarballs are byte-identical to sqlite.org's releases.
#
# The soname is libsqlite3.so.0, the same as the system library, so that with
# LD_PRELOAD the dynamic loader satisfies Python's _sqlite3 module with this
# library and never maps the system one (3.40 on Debian 12) beside it.
#
# Compile options: roughly a distro build (threadsafe, FTS3/4/5, JSON1, RTREE,
# column metadata, load_extension, usleep-based busy waits) but deliberately
# WITHOUT SQLITE_ENABLE_UPDATE_DELETE_LIMIT and WITHOUT math functions, which
# Debian enables, so SQL that only works on Debian's build fails here.
# SQLITE_ENABLE_DESERIALIZE is needed (before 3.36, where it became default)
# because Python >= 3.11's _sqlite3 links sqlite3_serialize/sqlite3_deserialize.
#
# Which Python can load which SQLite (the pyenv builds on this machine):
#   Python 3.8 .. 3.10: any version here.
#   Python >= 3.11 links sqlite3_create_window_function, so it needs SQLite
#   >= 3.25: with 3.24.0 `import sqlite3` fails with an ImportError
#   "undefined symbol: sqlite3_create_window_function".
set -euo pipefail

usage() {
    echo "usage: $0 VERSION   (one of: $(printf '%s\n' "${!NPM_VERSION[@]}" | sort -V | tr '\n' ' '))" >&2
    echo "       $0 --list" >&2
}

# SQLite version -> npm `sqlite3` release whose deps/ carries it, and the
# sha256 of deps/sqlite-autoconf-NNNNNNN.tar.gz in that release.
declare -A NPM_VERSION=(
    [3.24.0]=4.0.1    # also in 4.0.2 .. 4.0.4
    [3.26.0]=4.0.6
    [3.28.0]=4.1.0    # also in 4.0.7 .. 4.0.9
    [3.30.1]=4.1.1
    [3.31.1]=4.2.0    # also in 5.0.0
    [3.34.0]=5.0.2
    [3.38.2]=5.0.3
)
declare -A TARBALL_SHA256=(
    [3.24.0]=d9d14e88c6fb6d68de9ca0d1f9797477d82fc3aed613558f87ffbdbbc5ceb74a
    [3.26.0]=5daa6a3fb7d1e8c767cd59c4ded8da6e4b00c61d3b466d0685e35c4dd6d7bf5d
    [3.28.0]=d61b5286f062adfce5125eaf544d495300656908e61fca143517afcc0a89b7c3
    [3.30.1]=8c5a50db089bd2a1b08dbc5b00d2027602ca7ff238ba7658fabca454d4298e60
    [3.31.1]=62284efebc05a76f909c580ffa5c008a7d22a1287285d68b7825a2b6b51949ae
    [3.34.0]=bf6db7fae37d51754737747aaaf413b4d6b3b5fbacd52bdb2d0d6e5b2edd9aee
    [3.38.2]=e7974aa1430bad690a5e9f79a6ee5c8492ada8269dc675875ad0fb747d7cada4
)

if [[ $# -ne 1 ]]; then
    usage
    exit 2
fi
if [[ $1 == --list ]]; then
    printf '%s\n' "${!NPM_VERSION[@]}" | sort -V
    exit 0
fi

version=$1
if [[ -z ${NPM_VERSION[$version]+set} ]]; then
    echo "build-sqlite: unsupported SQLite version '$version'" >&2
    usage
    exit 2
fi

cache_root=${QUEUECTL_SQLITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/queuectl-sqlite}
dest_dir=$cache_root/$version
lib=$dest_dir/libsqlite3.so.0

if [[ -f $lib ]]; then
    echo "$(cd "$dest_dir" && pwd -P)/libsqlite3.so.0"
    exit 0
fi

for tool in npm gcc tar sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-sqlite: '$tool' is required to build SQLite $version but was not found in PATH" >&2
        exit 1
    fi
done

npm_version=${NPM_VERSION[$version]}
IFS=. read -r major minor patch <<<"$version"
autoconf_name=sqlite-autoconf-$(printf '%d%02d%02d00' "$major" "$minor" "$patch")

mkdir -p "$dest_dir"
work=$(mktemp -d "$dest_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "build-sqlite: fetching npm sqlite3@$npm_version for SQLite $version" >&2
(cd "$work" && npm pack --silent "sqlite3@$npm_version" >/dev/null) >&2
pkg=$work/sqlite3-$npm_version.tgz
if [[ ! -f $pkg ]]; then
    echo "build-sqlite: npm pack sqlite3@$npm_version did not produce $pkg" >&2
    exit 1
fi

tar -xzf "$pkg" -C "$work" "package/deps/$autoconf_name.tar.gz"
inner=$work/package/deps/$autoconf_name.tar.gz
actual_sha=$(sha256sum "$inner" | cut -d' ' -f1)
if [[ $actual_sha != "${TARBALL_SHA256[$version]}" ]]; then
    echo "build-sqlite: sha256 mismatch for $autoconf_name.tar.gz: got $actual_sha, want ${TARBALL_SHA256[$version]}" >&2
    exit 1
fi
tar -xzf "$inner" -C "$work" "$autoconf_name/sqlite3.c" "$autoconf_name/sqlite3.h"
src=$work/$autoconf_name

if ! grep -q "^#define SQLITE_VERSION *\"$version\"" "$src/sqlite3.c"; then
    echo "build-sqlite: $autoconf_name/sqlite3.c is not SQLite $version" >&2
    exit 1
fi

cflags=(
    -O2 -fPIC -g0 -w  # -w: old amalgamations trip gcc 12 false-positive warnings
    -DSQLITE_THREADSAFE=1
    -DSQLITE_ENABLE_FTS3 -DSQLITE_ENABLE_FTS3_PARENTHESIS
    -DSQLITE_ENABLE_FTS4 -DSQLITE_ENABLE_FTS5
    -DSQLITE_ENABLE_JSON1
    -DSQLITE_ENABLE_RTREE
    -DSQLITE_ENABLE_COLUMN_METADATA
    -DSQLITE_ENABLE_DBSTAT_VTAB
    -DSQLITE_ENABLE_UNLOCK_NOTIFY
    -DSQLITE_ENABLE_DESERIALIZE
    -DSQLITE_USE_URI=1
    # What ./configure detects on Linux.  HAVE_USLEEP matters: without it the
    # busy handler sleeps in whole seconds instead of milliseconds.
    -DHAVE_USLEEP=1 -DHAVE_FDATASYNC=1 -DHAVE_LOCALTIME_R=1 -DHAVE_GMTIME_R=1
    -DHAVE_POSIX_FALLOCATE=1 -DHAVE_STRERROR_R=1 -DHAVE_ISNAN=1
)

echo "build-sqlite: compiling SQLite $version (takes a little while)" >&2
start=$SECONDS
gcc "${cflags[@]}" -shared -Wl,-soname,libsqlite3.so.0 \
    "$src/sqlite3.c" -o "$work/libsqlite3.so.0" -lpthread -ldl -lm
echo "build-sqlite: compiled SQLite $version in $((SECONDS - start))s" >&2

# Atomic install: concurrent builds of the same version both end in a complete file.
mv -f "$work/libsqlite3.so.0" "$lib"
echo "$(cd "$dest_dir" && pwd -P)/libsqlite3.so.0"
