#!/usr/bin/env bash
# Run some tests again and again beside CPU-bound busy loops, to expose timing-dependent tests.
#   scripts/stress_tests.sh [-r ROUNDS] [-l LOADS] [TEST ...]
# ROUNDS pytest runs (default 5) with LOADS spinning processes (default 2) beside them; the default
# tests are the ones that read offline W&B runs written in-process. Prints a pass/fail tally and
# exits 1 if any round failed. The busy loops are killed, by their own ids, on any exit.
set -u
rounds=5
loads=2
while getopts "r:l:" opt; do
    case $opt in
        r) rounds=$OPTARG ;;
        l) loads=$OPTARG ;;
        *) echo "usage: $0 [-r ROUNDS] [-l LOADS] [TEST ...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -eq 0 ]; then
    set -- tests/test_cli.py::test_batched_edits_log_one_wandb_run_each \
           tests/test_report.py::test_report_goes_to_wandb_as_a_table
fi

cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
python=${PYTHON:-python}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}

spinners=()
stop_spinners() {
    for pid in "${spinners[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${spinners[@]}"; do wait "$pid" 2>/dev/null; done
    spinners=()
}
trap stop_spinners EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$loads"); do
    "$python" -c 'while True: pass' &
    spinners+=($!)
done
echo "load: ${#spinners[@]} busy loop(s), pids ${spinners[*]}"

passed=0
failed=0
log=$(mktemp)
for round in $(seq "$rounds"); do
    if "$python" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "round $round: passed"
    else
        failed=$((failed + 1))
        echo "round $round: FAILED"
        grep -E "^(FAILED|ERROR)|^E  " "$log" | head -8
    fi
done
rm -f "$log"
echo "under load ($loads busy loops): $passed passed, $failed failed, of $rounds rounds"
[ "$failed" -eq 0 ]
