#!/usr/bin/env bash
# Runs the same diffusax command on every worker of a Cloud TPU VM pod slice (v4/v5e/v5p multi-host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/cifar10.py --workdir=gs://BUCKET/runs/cifar10 [--config.X=...]
#
# Every worker runs `python -m diffusax.main` with identical flags; JAX finds the other workers from the
# TPU metadata (runtime.distributed="auto" starts jax.distributed when TPU_WORKER_HOSTNAMES lists several
# hosts; pass --config.runtime.distributed=on to force it). Each worker reads its own slice of every
# batch; process 0 alone writes logs, metrics and sample grids; checkpoints are written by all workers
# together, so the workdir must be shared storage (a GCS bucket or a filestore mount).
# Environment: REPO (checkout path on the workers, default ~/diffusax), PYTHON (default python3).
# A TPU preemption sends SIGTERM: the run saves after the current step and exits 0; run this again to resume.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [diffusax.main flags...]" >&2; exit 2
fi
tpu=$1 zone=$2; shift 2
REPO=${REPO:-'~/diffusax'}
PYTHON=${PYTHON:-python3}
args=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $REPO && $PYTHON -m diffusax.main$args"
