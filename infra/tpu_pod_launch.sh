#!/usr/bin/env bash
# Runs `gx run EXPERIMENT` on every host of a TPU pod slice (or of a list of GPU/CPU hosts) at
# once: one process per host, joined by jax.distributed into one global mesh. See
# infra/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: infra/tpu_pod_launch.sh [options] EXPERIMENT [-- GX_RUN_ARGS...]

Runs `gx run EXPERIMENT GX_RUN_ARGS...` on every host at the same time, with the multi-host
settings of gemini_core (config.distributed, config.mesh).

TPU pod slice (default): every worker of TPU VM NAME, through
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...
  passing --config.distributed.mode=auto: on TPU VMs jax.distributed.initialize() finds the
  coordinator, the process count and each host's id by itself.
    --tpu NAME           the TPU VM (pod slice) name                 (required in this mode)
    --zone ZONE          its zone                                    (default: gcloud's)
    --project PROJECT    its project                                 (default: gcloud's)

Host list (GPU/CPU clusters): `ssh HOST` to each host, with the settings explicit:
  --config.distributed.coordinator_address=FIRST_HOST:PORT
  --config.distributed.num_processes=N --config.distributed.process_id=I
    --hosts H1,H2,...    hosts in process order; the first is the coordinator
    --port PORT          coordinator port on the first host          (default: 8476)

Both modes:
    --mesh PRESET        --config.mesh.preset: dp, fsdp or fsdp_tp   (default: the experiment's)
    --repo-dir DIR       the repository on every host                (default: ~/gemini-core)
    --gx PATH            the gx CLI on every host                    (default: DIR/.venv/bin/gx)
    --runs-root DIR      runs root on every host: gx --runs-root DIR run (default: $GX_RUNS_ROOT there, else runs/ in --repo-dir)
    --setup              first copy this checkout (git archive HEAD) to every host and install
                         it in a Python 3.11 venv with uv (on TPU also jax[tpu])
    --print              print the commands instead of running them
    -h, --help           this help

Every host must see the same data root (e.g. a GCS FUSE or NFS mount): pass it as a
GX_RUN_ARG, e.g. -- --config.data.root=/mnt/shared/corpus. Checkpoints are written by all
processes, run records by process 0, so a shared --runs-root keeps one run directory.

examples:
  infra/tpu_pod_launch.sh --tpu my-v4-32 --zone us-central2-b --mesh fsdp \
      --runs-root /mnt/shared/runs experiments/pretrain.py:size=nano \
      -- --config.data.root=/mnt/shared/corpus
  infra/tpu_pod_launch.sh --hosts gpu0,gpu1 --mesh fsdp_tp \
      experiments/pretrain.py:size=nano,d=1024 -- --config.data.root=/mnt/shared/corpus
EOF
}

die() { echo "tpu_pod_launch.sh: error: $*" >&2; exit 2; }

tpu="" zone="" project="" hosts="" port=8476 mesh="" repo_dir='~/gemini-core' gx="" runs_root=""
setup=0 print_only=0 experiment=""
gx_args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --hosts) hosts="${2:?--hosts needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --mesh) mesh="${2:?--mesh needs a value}"; shift 2 ;;
    --repo-dir) repo_dir="${2:?--repo-dir needs a value}"; shift 2 ;;
    --gx) gx="${2:?--gx needs a value}"; shift 2 ;;
    --runs-root) runs_root="${2:?--runs-root needs a value}"; shift 2 ;;
    --setup) setup=1; shift ;;
    --print) print_only=1; shift ;;
    --) shift; gx_args=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$experiment" ]] || die "one EXPERIMENT only (got $experiment and $1)"
       experiment="$1"; shift ;;
  esac
done

[[ -n "$experiment" ]] || die "EXPERIMENT missing, e.g. experiments/pretrain.py:size=nano"
[[ -n "$tpu" && -n "$hosts" ]] && die "--tpu and --hosts exclude each other"
[[ -n "$tpu" || -n "$hosts" ]] || die "name the hosts: --tpu NAME or --hosts H1,H2,..."
case "$mesh" in ""|dp|fsdp|fsdp_tp) ;; *) die "--mesh $mesh: expected dp, fsdp or fsdp_tp" ;; esac
[[ "$port" =~ ^[0-9]+$ ]] || die "--port $port: expected a number"
gx="${gx:-$repo_dir/.venv/bin/gx}"

# Quoted for the remote shell, except a leading ~/ that the remote shell must expand.
rq() {
  if [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"; else printf '%q' "$1"; fi
}

# The command line each host runs; $1: extra --config.* settings for that host.
remote_run() {
  local cmd
  cmd="cd $(rq "$repo_dir") && $(rq "$gx")"
  [[ -z "$runs_root" ]] || cmd+=" --runs-root $(rq "$runs_root")"
  cmd+=" run $(printf '%q' "$experiment")"
  [[ -z "$mesh" ]] || cmd+=" --config.mesh.preset=$mesh"
  cmd+="$1"
  local arg
  for arg in "${gx_args[@]}"; do cmd+=" $(printf '%q' "$arg")"; done
  printf '%s' "$cmd"
}

remote_setup() {  # $1: extra pip requirement (jax[tpu] on TPU VMs) or empty
  local venv="$repo_dir/.venv" req=""
  [[ -z "$1" ]] || req=" $(printf '%q' "$1")"
  printf '%s' "mkdir -p $(rq "$repo_dir") && tar -xzf ~/gemini-core.tar.gz -C $(rq "$repo_dir")"
  printf '%s' " && (command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
  printf '%s' " && ~/.local/bin/uv venv --allow-existing --python 3.11 $(rq "$venv")"
  printf '%s' " && ~/.local/bin/uv pip install --python $(rq "$venv/bin/python") -e $(rq "$repo_dir")$req"
}

run() {  # print or run one command given as words
  if ((print_only)); then printf '%q ' "$@"; echo; else "$@"; fi
}

archive() {
  local out="${TMPDIR:-/tmp}/gemini-core.$$.tar.gz"
  if ((print_only)); then echo "$out"; return; fi
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$out" HEAD
  echo "$out"
}

if [[ -n "$tpu" ]]; then
  where=()
  [[ -z "$zone" ]] || where+=(--zone="$zone")
  [[ -z "$project" ]] || where+=(--project="$project")
  if ((setup)); then
    tarball="$(archive)"
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:gemini-core.tar.gz" --worker=all "${where[@]}"
    run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" \
      --command="$(remote_setup 'jax[tpu]')"
  fi
  # all workers start together; JAX detects the coordinator and process ids on TPU VMs
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" \
    --command="$(remote_run " --config.distributed.mode=auto")"
else
  IFS=',' read -r -a host_list <<<"$hosts"
  n=${#host_list[@]}
  coordinator="${host_list[0]#*@}:$port"
  if ((setup)); then
    tarball="$(archive)"
    for host in "${host_list[@]}"; do
      run scp "$tarball" "$host:gemini-core.tar.gz"
      run ssh "$host" "$(remote_setup '')"
    done
  fi
  pids=()
  for i in "${!host_list[@]}"; do
    settings=" --config.distributed.coordinator_address=$coordinator"
    settings+=" --config.distributed.num_processes=$n --config.distributed.process_id=$i"
    if ((print_only)); then
      run ssh "${host_list[$i]}" "$(remote_run "$settings")"
    else
      ssh "${host_list[$i]}" "$(remote_run "$settings")" &
      pids+=($!)
    fi
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit "$status"
fi
