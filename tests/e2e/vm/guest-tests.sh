#!/bin/sh
# Runs inside the test VM (see run.sh): every test binary given, one test at a time, with ublk
# required, ignored tests included (the ublk tests are ignored on hosts without ublk). Exits
# non-zero if any failed.
export LAZY_IMAGE_REQUIRE_UBLK=1 LAZY_IMAGE_TEST_BACKEND=ublk LAZY_IMAGE_RESULTS=/results/results.txt
[ -e /dev/ublk-control ] || { echo "guest-tests: /dev/ublk-control is missing"; exit 1; }
status=0
for bin in "$@"; do
    echo "guest-tests: running $(basename "$bin")"
    "$bin" --test-threads=1 --include-ignored || status=1
done
exit $status
