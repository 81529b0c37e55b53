#!/bin/sh
# Enqueue some commands, wait until every one of them is completed or dead,
# print their output, and exit like `queuectl wait`: 0 if all completed,
# else the exit code of the first one (in argument order) that ended in the
# DLQ (1 if it had none, e.g. a timeout), 124 if the wait timed out.
#
#   examples/enqueue-and-wait.sh                       # three demo jobs
#   examples/enqueue-and-wait.sh 'make test' 'make lint'
#
# Needs a worker on the same database, e.g. in another shell:
#   queuectl worker start --count 2
# Set QUEUECTL to run queuectl some other way (QUEUECTL="python3 ./queuectl.py")
# and WAIT_TIMEOUT to give up sooner or later than an hour.
set -eu

QUEUECTL=${QUEUECTL:-queuectl}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-1h}

if [ $# -eq 0 ]; then
    set -- 'echo one' 'sleep 0.5 && echo two' 'echo three'
fi

ids=""
for command in "$@"; do
    # enqueue prints only the new id on stdout. With set -e a refused job
    # (the reason is on stderr) ends the script at once; the jobs enqueued
    # before it stay queued.
    id=$($QUEUECTL enqueue --max-retries 1 --timeout 10m -- "$command")
    echo "enqueued $id: $command" >&2
    ids="$ids $id"
done

status=0
# $ids is split on purpose: one argument per id.
$QUEUECTL wait --timeout "$WAIT_TIMEOUT" $ids || status=$?

for id in $ids; do
    echo "--- $id" >&2
    $QUEUECTL logs "$id" || true
done
exit "$status"
