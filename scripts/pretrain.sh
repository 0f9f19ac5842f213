#!/usr/bin/env bash
# Start `sparse-lm pretrain` (or another training subcommand) on N ranks through
# the DeepSpeed launcher.
#
#   scripts/pretrain.sh [--nproc N] [--hostfile FILE] [--num_nodes K] [--master_port P]
#                       [--command pretrain|train-dense] [--] ARGS...
#
# ARGS go to the subcommand, e.g. `--preset tiny train.steps=200`.
# GPUs: one rank per GPU (default N = visible GPUs), nccl.
# CPU: gloo, N ranks (default 1) with OMP_NUM_THREADS = cores / N each: without
#      it two ranks on two cores run 5-20x slower.
# Multi-node: --hostfile / --num_nodes are passed to the launcher as they are.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
ds="$(dirname "$py")/deepspeed"
[[ -x "$ds" ]] || ds="$(command -v deepspeed || true)"
[[ -n "$ds" ]] || { echo "pretrain.sh: the deepspeed launcher is not installed (pip install deepspeed)" >&2; exit 2; }

nproc="" ; command="pretrain" ; launcher_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --hostfile|--num_nodes|--master_port|--master_addr|--include|--exclude|--launcher)
      launcher_args+=("$1" "$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

gpus="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ "$gpus" -gt 0 ]]; then
  nproc="${nproc:-$gpus}"
  export DS_ACCELERATOR=cuda
else
  nproc="${nproc:-1}"
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$(( cores / nproc )); [[ $threads -ge 1 ]] || threads=1
  export DS_ACCELERATOR=cpu
  export LOCAL_SIZE="$nproc"              # the CPU accelerator's "device count"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # busy-waiting threads starve the other rank
fi
if [[ -z "${launcher_args[*]:-}" || " ${launcher_args[*]} " != *" --master_port "* ]]; then
  port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  launcher_args+=(--master_port "$port")
else
  for ((i = 0; i < ${#launcher_args[@]}; i++)); do
    [[ "${launcher_args[$i]}" == --master_port ]] && port="${launcher_args[$((i + 1))]}"
  done
fi

# DeepSpeed's CPU all-reduce leaves one 66 MB buffer per rank in /dev/shm (RAM) after every run, finished or
# killed (/dev/shm/deepspeed_allreduce_buffer_<i>_<addr>_<port>_<rank>); 124 of them held 8 GB on a
# development machine. This run's buffers are named by its master port: remove them when it ends.
cleanup_shm() { rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true; }
trap cleanup_shm EXIT

# A JIT build (DeepSpeed's CPU op, the AbsTopK op) killed midway leaves its `lock` file behind, and every later
# start then waits on it forever without a word (seen twice on a development machine). A build takes under a
# minute: a lock older than 10 minutes while no build runs is stale.
ext_dir="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
if [[ -d "$ext_dir" ]] && ! pgrep -x ninja >/dev/null 2>&1; then
  while IFS= read -r stale; do
    echo "pretrain.sh: removing $stale, left by a JIT build that was killed" >&2
    rm -f "$stale"
  done < <(find "$ext_dir" -maxdepth 3 -name lock -mmin +10 2>/dev/null)
fi

echo "pretrain.sh: $nproc rank(s) on $([[ $gpus -gt 0 ]] && echo "GPU (nccl)" || echo "CPU (gloo, OMP_NUM_THREADS=$OMP_NUM_THREADS)")" >&2
"$ds" --num_gpus "$nproc" "${launcher_args[@]}" --no_local_rank --module sparse_lm_app "$command" "$@"
