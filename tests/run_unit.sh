#!/usr/bin/env bash
# Runs the GoogleTest binary given as $1 and ends with the line "N passed, M failed" that CI reads.
set -u
bin=${1:?usage: run_unit.sh TEST_BINARY [gtest args]}
shift
log=$(mktemp)
"$bin" --gtest_brief=0 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -c '^\[       OK \]' "$log")
failed=$(grep -c '^\[  FAILED  \] .*(' "$log")
rm -f "$log"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi   # crash before any result
echo "$passed passed, $failed failed"
exit $status
