#!/usr/bin/env bash
# One node's share of a (multi-node) run: starts `accelerate launch` (a torchrun agent) that spawns
# GPUS_PER_NODE training processes and joins the other nodes through a c10d rendezvous hosted by
# the node of rank 0. train.sbatch runs it once per node (srun --ntasks-per-node=1);
# tests/test_scale.py runs it twice on one machine to stand for two nodes.
#
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=node01 MASTER_PORT=29500 \
#       launch/slurm/node_launch.sh launch/train.py --config configs/cifar10.yaml run.dir=/shared/runs/c10
#
# Environment (defaults in brackets):
#   NNODES [1], NODE_RANK [0], GPUS_PER_NODE [1]  processes on this node; the total is NNODES*GPUS_PER_NODE
#   MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]  rendezvous endpoint on the node of rank 0
#   ACCELERATE_CONFIG [launch/accelerate/multinode_ddp.yaml]  distributed type etc.; the values
#                     above override its num_machines / machine_rank / num_processes / main_process_*
#   RDZV_TIMEOUT [900]  seconds a node waits for the others to join
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT [120]  seconds the agent gives its workers after SIGTERM
#                     before SIGKILL (they checkpoint first; torch's default is 30)
# Arguments: the training script and its arguments.
#
# Signals. SIGUSR1 means "checkpoint and stop" (train.sbatch sends it 120 s before the time limit).
# The training processes handle it themselves; the torchrun agent would die of it (default action),
# so the agent runs with SIGUSR1 ignored and this shell forwards it to the training processes.
# Slurm may deliver a step's signal to this shell's process group only (proctrack/pgid) or to
# every process of the step (proctrack/cgroup); both work, a training process seeing it twice is
# harmless. SIGTERM goes to the agent, which passes it on to its workers (they checkpoint too).
# A training process ignores SIGUSR1 until its training loop has started (startup, data, resume).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$REPO/launch/accelerate/multinode_ddp.yaml}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

if [[ $# -eq 0 ]]; then
    echo "usage: $0 TRAINING_SCRIPT [ARGS...]  (see the header of this file)" >&2
    exit 2
fi

if [[ $NNODES -gt 1 ]]; then
    # c10d rendezvous on MASTER_ADDR:MASTER_PORT. Only the node of rank 0 hosts its store
    # (torchrun would otherwise guess from the host name, and two "nodes" on one machine, as in
    # the tests, would both try). Global ranks are handed out by the rendezvous, so rank 0 (which
    # writes checkpoints and logs) may live on any node: RUN_DIR must be on shared storage.
    is_host=$([[ $NODE_RANK -eq 0 ]] && echo 1 || echo 0)
    rendezvous=(--rdzv_backend c10d --rdzv_conf "is_host=$is_host,join_timeout=$RDZV_TIMEOUT")
else
    rendezvous=(--rdzv_backend static)
fi

echo "node_launch: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
(
    trap '' USR1  # inherited through exec by the agent (and by its workers until they set a handler)
    exec accelerate launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" \
        --machine_rank "$NODE_RANK" \
        --num_processes $((NNODES * GPUS_PER_NODE)) \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        "${rendezvous[@]}" \
        --max_restarts 0 \
        "$@"
) &
agent=$!

# The agent's children are the training processes (their data-loader workers ignore SIGUSR1).
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'kill -TERM "$agent" 2>/dev/null || true' TERM

# `wait` returns early when a trapped signal arrives: keep waiting until the agent is gone, then
# take its exit status (bash keeps it for a reaped child).
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" || true
done
wait "$agent"
