#!/usr/bin/env bash
# N diffusax processes on this machine, joined by jax.distributed over loopback (CPU collectives: gloo).
# For trying multi-host code paths without a cluster; every process gets its own fake CPU devices.
#
#   launch/local_multiprocess.sh NUM_PROCESSES --config=configs/toy2d.py --workdir=runs/toy2d_mp [--config.X=...]
#
# Environment: PYTHON (default: python), PORT (coordinator port; default: a free one, reserved for the
# whole run, see below), CPU_DEVICES_PER_PROCESS (default 1). All processes share the workdir: checkpoints are written
# collectively, logs, metrics and sample grids only by process 0. SIGINT/SIGTERM to this script are
# forwarded to every process as SIGTERM (JAX's preemption sync picks one step; all save it and exit 0).
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [diffusax.main flags...]" >&2; exit 2
fi
n=$1; shift
PYTHON=${PYTHON:-python}
holder=
if [[ -n ${PORT:-} ]]; then
  port=$PORT
else
  # A free port, held until this script exits, so nothing else can take it between the pick and the
  # coordinator's bind: a helper binds [::]:0 (never listening) with SO_REUSEPORT, which the coordinator's
  # gRPC server also sets, so the coordinator binds beside it while any other bind gets EADDRINUSE.
  portfile=$(mktemp)
  "$PYTHON" -m diffusax.parallel.port "$$" >"$portfile" &
  holder=$!
  until [[ $(wc -l <"$portfile") -ge 1 ]]; do
    kill -0 "$holder" 2>/dev/null || { echo "$0: could not reserve a port" >&2; exit 1; }
    sleep 0.05
  done
  read -r port <"$portfile"
  rm -f "$portfile"
fi
release() { if [[ -n $holder ]]; then kill "$holder" 2>/dev/null || true; fi; }
trap release EXIT
devs=${CPU_DEVICES_PER_PROCESS:-1}
# Keep the caller's XLA flags except a device count, which is set per process here.
flags=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward TERM' INT   # Ctrl-C: a preemption notice, so all stop at the same step.
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devs" \
    "$PYTHON" -m diffusax.main "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while :; do
    set +e; wait "$p"; s=$?; set -e
    kill -0 "$p" 2>/dev/null || break   # wait returned early for a forwarded signal: wait again.
  done
  if [[ $s -ne 0 && $rc -eq 0 ]]; then rc=$s; fi
done
exit $rc
