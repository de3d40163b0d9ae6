#!/usr/bin/env bash
# One command: the gateway against a bare aiohttp pass-through on loopback, with wrk (see bench.py).
#
#   bench/run.sh                    default matrix: chat at 1/16/64 connections + stream at 16 (~6 min)
#   bench/run.sh --baseline main    also the gateway of git ref main (gateway-base), same rounds: the summary
#                                   says whether this tree's RPS dropped more than 5 % against it (~8 min)
#   bench/run.sh --soak 1000000     memory soak instead: RSS after 1M requests vs after the first 50k
#   bench/run.sh --instructions     instructions per request under callgrind, bare vs gateway (~3 min)
#   bench/run.sh --profile          also py-spy the gateway under load (needs py-spy, see --py-spy)
#   bench/run.sh --help             every option
#
#   BENCH_PYTHON   interpreter with the gateway's dependencies (default: $VIRTUAL_ENV, ./.venv, ../venv, python3)
#   BENCH_TIMEOUT  hard bound of the whole run in seconds (default 600; 900 with --baseline or --targets;
#                  soak bound + 300 with --soak; 1200 with --instructions)
# Needs nothing outside the repository: the mock upstream and the bare reference proxy are in bench/.
# Installs wrk, taskset and redis-server (and valgrind for --instructions) with apt-get when missing.
# Results: bench/results/<stamp>/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"

pick_python() {
  for candidate in "${BENCH_PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$repo/.venv/bin/python" \
                   "$repo/../venv/bin/python" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && \
       PYTHONPATH="$repo" "$candidate" -c 'import gateway.cli, aiohttp, yaml, redis' >/dev/null 2>&1; then
      echo "$candidate"; return 0
    fi
  done
  echo "bench: no Python with the gateway's dependencies; set BENCH_PYTHON=/path/to/venv/bin/python" >&2
  return 1
}

case "${1:-}" in -h|--help) exec "$(pick_python)" "$here/bench.py" run --help ;; esac

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[[ " $* " == *" --instructions "* ]] && ! command -v callgrind_control >/dev/null 2>&1 && missing+=(valgrind)
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "bench: apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python="$(pick_python)"
bound="${BENCH_TIMEOUT:-600}"
args=" $* "
if [[ "$args" == *" --soak "* ]] && [ -z "${BENCH_TIMEOUT:-}" ]; then
  soak_max=1800
  [[ "$args" =~ --soak-max-s[\ =]([0-9]+) ]] && soak_max="${BASH_REMATCH[1]}"
  bound=$((soak_max + 300))
fi
[[ "$args" == *" --baseline"* || "$args" == *" --targets"* ]] && [ -z "${BENCH_TIMEOUT:-}" ] && bound=900
[[ "$args" == *" --instructions "* ]] && [ -z "${BENCH_TIMEOUT:-}" ] && bound=1200
exec timeout --signal=TERM --kill-after=30 "$bound" "$python" "$here/bench.py" run "$@"
