#!/usr/bin/env bash
# Cloud TPU launcher for mefem_jax: create a TPU VM or pod slice, install the package on every
# worker, run the same `python -m mefem_jax.train` on all of them, follow the log, delete.
#
#   launch/tpu_pod.sh all --name=mefem-b --zone=us-east5-a --accelerator-type=v5p-64 \
#       --workdir=gs://my-bucket/mefem_b -- --config.mesh.fsdp=8
#
# Every command is printed ("+ ...", on stderr) before it runs; --dry-run prints them and runs none.
# `launch/tpu_pod.sh -h` lists the subcommands and options; launch/README.md walks through a run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=/dev/null  # lib.sh is checked on its own (tests/test_launch.py)
source "$ROOT/launch/lib.sh"  # the bash version check, die, quote, parse_options, check_train_args
readonly ROOT
# jax must match setup.py's pin (tests/test_launch.py checks); [tpu] adds the matching libtpu.
readonly JAX_TPU='jax[tpu]==0.10.2'
# What the launcher keeps in each worker's home directory.
readonly REMOTE_SRC=mefem_jax            # the checkout (or configs/ + wheel); training runs here
readonly REMOTE_VENV=mefem_jax_venv      # Python >= 3.11 environment made with uv
readonly REMOTE_RUN=mefem_jax_run        # train.log, train.pid (process group), train.exit
readonly RUN="\$HOME/$REMOTE_RUN"         # ... as the workers' shell spells it
readonly SRC_TARBALL=mefem_jax-src.tar.gz
readonly POLL_SECONDS=60                 # queued resources: how often to ask whether it is ACTIVE
# gs:// data specs are read at GCS_MOUNT_ROOT/BUCKET/PATH: this must equal MOUNT_ROOT in
# mefem_jax/data/gcs.py, where training maps the specs (tests/launch/test_tpu_pod_gcs.py checks).
readonly GCS_MOUNT_ROOT=/mnt/gcs
readonly GCS_CACHE_ROOT=/mnt/gcs_cache   # gcsfuse's file cache, one folder per bucket, on the boot disk
# Bucket names as Cloud Storage allows them (the same pattern as gcs.py's).
readonly BUCKET_PATTERN='[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]'
readonly LOCAL_PYTHON=${PYTHON:-python3}  # this machine's, for the HBM fit check before creating

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND --name=NAME --zone=ZONE [options] [-- TRAIN_ARGS...]

Runs mefem_jax pretraining on a Cloud TPU VM or pod slice. Every worker gets the same code and runs
the same `python -m mefem_jax.train`; JAX finds the other workers of the slice by itself.

Subcommands
  create    create the TPU VM (with --queued: a queued resource, then wait until it is ACTIVE)
  install   copy the code to every worker and install it with jax[tpu] into ~/mefem_jax_venv
  train     start training on every worker, detached (it survives a dropped connection); first
            mounts, on every worker, the Cloud Storage buckets of the run's gs:// data specs
            (see "Data on Cloud Storage" below)
  logs      follow one worker's training log (default worker 0) until the run ends
  stop      SIGTERM the training on every worker: it saves a checkpoint, then exits
  delete    delete the TPU VM or queued resource
  all       check, create, install, train in the foreground, then delete -- also when training
            fails or is interrupted with Ctrl-C (the workdir on gs:// keeps checkpoints and metrics).
            The check compiles the train step for the slice on this machine first
            (mefem_jax.compile_check, needs libtpu here: pip install -e ".[tpu]") and stops
            before anything is created if it does not fit in HBM

Options (every subcommand accepts all of them, so one set of flags serves the whole life cycle)
  --name=NAME              TPU name: lower-case letters, digits and '-'                [required]
  --zone=ZONE              e.g. us-east5-a                                             [required]
  --project=PROJECT        default: gcloud's configured project
  --accelerator-type=TYPE  e.g. v5p-64, v4-32, v5litepod-16, v6e-64                   [create, all]
  --version=RUNTIME        TPU software version; default from the type: v6e v2-alpha-tpuv6e,
                           v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v2-v4 tpu-ubuntu2204-base
  --queued                 create/delete through `gcloud compute tpus queued-resources`
  --spot                   Spot capacity: cheaper, can be preempted at any time
  --preemptible            legacy preemptible TPU VM (not with --queued; prefer --spot)
  --create-arg=ARG         extra flag for the create call, repeatable (e.g. --create-arg=--reserved)
  --install-from=SOURCE    local (default): this checkout's tracked and untracked-but-not-ignored
                           files, installed with `pip install -e .`; PATH.whl: a wheel (build it
                           with `pip wheel --no-deps -w dist .`); anything else: a pip requirement,
                           e.g. 'mefem_jax @ git+https://github.com/ORG/mefem_jax'. Wheel and
                           requirement installs ship this checkout's configs/ alongside.
  --python-version=X.Y     Python of the workers' venv (default 3.11: jax 0.10.2 needs >= 3.11,
                           the TPU images ship 3.10, so uv fetches one)
  --config=PATH[:ARG]      config file inside this checkout (default configs/vitb.py)  [train, all]
  --workdir=gs://BUCKET/.. run directory; must be shared by all workers                [train, all]
  --env=KEY=VALUE          exported on every worker before training, repeatable
  --foreground             train: stay attached and stream every worker's output
  --worker=N               logs: which worker to follow (default 0)
  --mount-bucket=BUCKET    train, all: also mount this bucket (repeatable), e.g. one that the
                           config file's data specs name; those of --config.data.* and
                           --config.eval.* after `--` are mounted without it
  --gcsfuse-arg=ARG        extra gcsfuse flag for those mounts, repeatable; later flags win, e.g.
                           --gcsfuse-arg=--file-cache-max-size-mb=200000
  --no-check               all: skip the HBM fit check before creating the slice
  --dry-run                print every command, run none
  -h, --help               this text

Everything after `--` goes verbatim to mefem_jax.train, e.g. -- --config.mesh.fsdp=8

Data on Cloud Storage
  Training reads a gs://BUCKET/PATH data spec at /mnt/gcs/BUCKET/PATH (mefem_jax/data/gcs.py).
  Before training, every worker installs gcsfuse if missing (Google's apt repository) and mounts
  each bucket read-only there, with a 40 GiB file cache in /mnt/gcs_cache/BUCKET (the flags and why:
  GCSFUSE_DEFAULTS in this script). A bucket already mounted is left as it is; --dry-run shows it all.
EOF
}

warn() { echo "tpu_pod.sh: warning: $*" >&2; }

run() { # print, then run unless --dry-run
  printf '+ %s\n' "$(quote "$@")" >&2
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# SCOPE (--zone, --project) locates the TPU and ends every gcloud call.
tpu_vm() { run gcloud compute tpus tpu-vm "$@" "${SCOPE[@]}"; }
queued() { run gcloud compute tpus queued-resources "$@" "${SCOPE[@]}"; }
on_workers() { tpu_vm ssh "$NAME" --worker="$1" --command="$2"; }

# gcsfuse flags for the data mounts, before --gcsfuse-arg (gcsfuse keeps the last of a repeated flag):
# --implicit-dirs: folders uploaded with `gcloud storage cp -r` have no folder objects, and would look empty;
# -o ro: training only reads its data, and a read-only mount cannot change it;
# the file cache, read whole on the first range read: Grain reads records at random offsets, and without
# it every epoch would fetch each record again; parallel downloads fetch a shard over many connections.
# 40 GiB of cache leaves room on a TPU VM's 100 GiB boot disk; a larger dataset is evicted and re-read.
readonly GCSFUSE_DEFAULTS=(--implicit-dirs -o ro --file-cache-max-size-mb=40960
  --file-cache-cache-file-for-range-read=true --file-cache-enable-parallel-downloads=true)

# The buckets that the training arguments' data specs (--config.data.* / --config.eval.*, as
# --key=value or --key value) name as gs://BUCKET/..., then those of --mount-bucket, each once.
data_buckets() {
  local arg prev="" value found=() b
  for arg in "${TRAIN_ARGS[@]}"; do
    value=""
    if [[ $arg =~ ^--config\.(data|eval)\.[A-Za-z0-9_.]+=(.*)$ ]]; then
      value=${BASH_REMATCH[2]}
    elif [[ $prev =~ ^--config\.(data|eval)\.[A-Za-z0-9_.]+$ ]]; then
      value=$arg
    fi
    prev=$arg
    while [[ $value =~ gs://($BUCKET_PATTERN) ]]; do
      found+=("${BASH_REMATCH[1]}")
      value=${value#*"${BASH_REMATCH[0]}"}
    done
  done
  for b in "${found[@]}" "${MOUNT_BUCKETS[@]}"; do
    if [[ " ${GCS_BUCKETS[*]} " != *" $b "* ]]; then GCS_BUCKETS+=("$b"); fi
  done
}

# Worker-side shell: install gcsfuse unless present (apt waits for the lock unattended-upgrades often
# holds on a fresh VM), then mount each bucket that is not mounted yet.
mount_command() {
  local script b where cache
  script="set -e; if ! command -v gcsfuse >/dev/null 2>&1; then echo \"installing gcsfuse on \$(hostname)\"; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \
sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get -o DPkg::Lock::Timeout=600 update -qq; \
sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi"
  for b in "${GCS_BUCKETS[@]}"; do
    where=$GCS_MOUNT_ROOT/$b
    cache=$GCS_CACHE_ROOT/$b
    script+="; if mountpoint -q $where; then echo \"$where is mounted on \$(hostname)\"; else \
sudo mkdir -p $where $cache; sudo chown \"\$(id -u):\$(id -g)\" $where $cache; \
gcsfuse $(quote "${GCSFUSE_DEFAULTS[@]}" "--cache-dir=$cache" "${GCSFUSE_ARGS[@]}" "$b" "$where"); fi"
  done
  printf '%s' "$script"
}

mount_buckets() {
  if ((${#GCS_BUCKETS[@]})); then on_workers all "$(mount_command)"; fi
}

# Worker-side shell: stop here if this worker is already training (the code is in use, the TPU busy).
guard_idle() {
  printf '%s' "if [ -f $RUN/train.pid ] && kill -0 -- \"-\$(cat $RUN/train.pid)\" 2>/dev/null; then \
echo \"a training run is active on \$(hostname); end it first with: tpu_pod.sh stop\" >&2; exit 1; fi; "
}

default_runtime() { # TPU software version for an accelerator type
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------------
# Subcommands

cmd_create() {
  create_resource
  if ((QUEUED)); then wait_until_active; fi
}

create_resource() {
  local extra=()
  if ((SPOT)); then extra+=(--spot); fi
  if ((PREEMPTIBLE)); then extra+=(--preemptible); fi
  extra+=("${CREATE_ARGS[@]}")
  if ((QUEUED)); then
    # Returns once the request is accepted; the TPU comes when capacity does (wait_until_active).
    queued create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$VERSION" "${extra[@]}"
  else
    # Returns once the VM is READY.
    tpu_vm create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
  fi
}

wait_until_active() {
  local state
  while true; do
    state=$(queued describe "$NAME" --format='value(state.state)')
    if ((DRY_RUN)); then return 0; fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED)
        echo "tpu_pod.sh: queued resource $NAME is $state; details:" \
          "gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
        return 1
        ;;
    esac
    echo "queued resource $NAME is ${state:-not listed yet}; asking again in ${POLL_SECONDS}s" >&2
    sleep "$POLL_SECONDS"
  done
}

cmd_install() {
  STAGE=$(mktemp -d) # removed by on_exit
  local tarball=$STAGE/$SRC_TARBALL spec=()
  if [[ $INSTALL_FROM == local ]]; then
    pack_checkout "$tarball"
    spec=(-e .)
  elif [[ $INSTALL_FROM == *.whl ]]; then
    run tar -czf "$tarball" -C "$ROOT" configs -C "$(dirname "$INSTALL_FROM")" "$(basename "$INSTALL_FROM")"
    spec=("./$(basename "$INSTALL_FROM")")
  else
    run tar -czf "$tarball" -C "$ROOT" configs
    spec=("$INSTALL_FROM")
  fi
  tpu_vm scp "$tarball" "$NAME:$SRC_TARBALL" --worker=all
  # uv, because the TPU images' Python (3.10) is older than jax 0.10.2 allows: it fetches a
  # standalone Python instead of apt (whose lock is often held by unattended-upgrades on a fresh VM).
  # PIP_BREAK_SYSTEM_PACKAGES lets a --user install through on images that mark Python as
  # externally managed; older pips ignore it.
  on_workers all "set -e; $(guard_idle)rm -rf $REMOTE_SRC $REMOTE_VENV; mkdir -p $REMOTE_SRC $REMOTE_RUN; \
tar -xzf $SRC_TARBALL -C $REMOTE_SRC; rm $SRC_TARBALL; \
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv; \
python3 -m uv venv --python $(quote "$PYTHON_VERSION") $REMOTE_VENV; \
cd $REMOTE_SRC; python3 -m uv pip install --python ../$REMOTE_VENV/bin/python $(quote "${spec[@]}" "$JAX_TPU")"
}

# Tars the checkout as git sees it: tracked files plus untracked ones that .gitignore does not
# exclude, so local edits and new configs travel but runs, weights and .git stay home.
pack_checkout() {
  printf '+ %s | %s\n' "$(quote git -C "$ROOT" ls-files -z --cached --others --exclude-standard)" \
    "$(quote tar -C "$ROOT" --null -T - -czf "$1")" >&2
  if ((DRY_RUN)); then return 0; fi
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
      # A tracked file deleted in the working tree is still listed; tar would fail on it.
      if [[ -e $ROOT/$path ]]; then printf '%s\0' "$path"; fi
    done |
    tar -C "$ROOT" --null -T - -czf "$1"
}

# The command line every worker runs, from inside ~/mefem_jax so the config path resolves.
train_command() {
  local exports="" kv
  for kv in "${ENV_VARS[@]}"; do exports+="export $(quote "$kv"); "; done
  # --multihost: every worker calls jax.distributed.initialize(), which finds the slice's other
  # workers from the TPU metadata (no coordinator flags on TPU).
  printf '%s' "${exports}\$HOME/$REMOTE_VENV/bin/python $(quote -m mefem_jax.train "--config=$CONFIG" \
    "--workdir=$WORKDIR" --multihost "${TRAIN_ARGS[@]}")"
}

cmd_train() {
  local train
  mount_buckets
  train=$(train_command)
  if ((FOREGROUND)); then
    on_workers all "set -e -o pipefail; $(guard_idle)cd $REMOTE_SRC; rm -f $RUN/train.pid $RUN/train.exit; \
$train 2>&1 | tee $RUN/train.log"
    return
  fi
  # Detached: setsid puts the run in its own session (no SIGHUP when ssh goes away) and its own
  # process group, whose id goes to train.pid so `stop` can signal python and its workers at once.
  on_workers all "set -e; $(guard_idle)cd $REMOTE_SRC; rm -f $RUN/train.exit; \
setsid bash -c $(quote "$train; echo \$? > $RUN/train.exit") > $RUN/train.log 2>&1 < /dev/null & \
echo \$! > $RUN/train.pid; echo \"training started on \$(hostname); log: $RUN/train.log\""
}

cmd_logs() {
  # tail --pid stops following when the run ends; the exit status is then training's own.
  on_workers "$LOG_WORKER" "set -e; cd $RUN; \
if [ ! -f train.log ]; then echo \"no training log on \$(hostname); start a run with: tpu_pod.sh train\" >&2; exit 1; fi; \
if [ -f train.pid ]; then tail --pid=\"\$(cat train.pid)\" -n +1 -F train.log; else cat train.log; fi; \
if [ -f train.exit ]; then echo \"training exited with status \$(cat train.exit)\"; exit \"\$(cat train.exit)\"; fi"
}

cmd_stop() {
  on_workers all "if [ -f $RUN/train.pid ] && kill -0 -- \"-\$(cat $RUN/train.pid)\" 2>/dev/null; \
then kill -TERM -- \"-\$(cat $RUN/train.pid)\"; echo \"SIGTERM sent to the training on \$(hostname)\"; \
else echo \"no training running on \$(hostname)\"; fi"
}

cmd_delete() {
  if ((QUEUED)); then
    queued delete "$NAME" --force --quiet # --force deletes the TPU VM along with the request
  else
    tpu_vm delete "$NAME" --quiet
  fi
}

# Before paying for the slice: compile the run for it here, and stop if it cannot fit in HBM.
preflight_check() {
  local overrides=() arg
  if ((NO_CHECK)); then return; fi
  if ((!DRY_RUN)) && ! "$LOCAL_PYTHON" -c 'import libtpu' 2>/dev/null; then
    warn "libtpu is not installed here, so the HBM fit is not checked before creating" \
      "(pip install -e '.[tpu]', or pass --no-check)"
    return
  fi
  for arg in "${TRAIN_ARGS[@]}"; do
    if [[ $arg == --config.* ]]; then overrides+=("$arg"); fi
  done
  (cd "$ROOT" && run "$LOCAL_PYTHON" -m mefem_jax.compile_check "--config=$CONFIG" \
    "--topology=$ACCELERATOR" "${overrides[@]}")
}

cmd_all() {
  preflight_check
  create_resource
  TEARDOWN=1 # from here on, on_exit deletes the TPU (or the queued request) whatever happens
  if ((QUEUED)); then wait_until_active; fi
  cmd_install
  FOREGROUND=1
  cmd_train
}

on_exit() {
  local status=$?
  if [[ -n $STAGE ]]; then rm -rf "$STAGE"; fi
  if ((TEARDOWN)); then
    TEARDOWN=0
    echo "tpu_pod.sh: tearing down $NAME (run ended with status $status)" >&2
    cmd_delete || status=$?
  fi
  exit "$status"
}

# ---------------------------------------------------------------------------------------------------
# Arguments

parse_args() {
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    create | install | train | logs | stop | delete | all) SUBCOMMAND=$1 ;;
    *) die "unknown subcommand '$1' (one of: create install train logs stop delete all)" ;;
  esac
  shift
  parse_options "--dry-run --queued --spot --preemptible --foreground --no-check" "--name --zone --project \
--accelerator-type --version --create-arg --install-from --python-version --config --workdir --env --worker \
--mount-bucket --gcsfuse-arg" "$@"
}

set_option() { # NAME VALUE, from parse_options (lib.sh)
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --no-check) NO_CHECK=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --foreground) FOREGROUND=1 ;;
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --create-arg) CREATE_ARGS+=("$2") ;;
    --install-from) INSTALL_FROM=$2 ;;
    --python-version) PYTHON_VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --env) ENV_VARS+=("$2") ;;
    --worker) LOG_WORKER=$2 ;;
    --mount-bucket) MOUNT_BUCKETS+=("$2") ;;
    --gcsfuse-arg) GCSFUSE_ARGS+=("$2") ;;
  esac
}

validate() {
  [[ -n $NAME ]] || die "--name is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name '$NAME': use lower-case letters, digits and '-', starting with a letter (max 63)"
  [[ -n $ZONE ]] || die "--zone is required (e.g. --zone=us-east5-a)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-east5-a)"
  if ((SPOT && PREEMPTIBLE)); then die "--spot and --preemptible exclude each other"; fi
  if ((QUEUED && PREEMPTIBLE)); then die "--preemptible is for plain TPU VMs; use --spot with --queued"; fi
  [[ $LOG_WORKER =~ ^[0-9]+$ ]] || die "--worker '$LOG_WORKER' must be a worker number (0, 1, ...)"
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version '$PYTHON_VERSION' must look like 3.11"
  local kv
  for kv in "${ENV_VARS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' must be KEY=VALUE"
  done

  SCOPE=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE+=("--project=$PROJECT"); fi

  case $SUBCOMMAND in
    create | all)
      [[ -n $ACCELERATOR ]] || die "$SUBCOMMAND needs --accelerator-type (e.g. v5p-64, v4-32)"
      [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
        die "--accelerator-type '$ACCELERATOR' does not look like v5p-64, v4-32 or v5litepod-16"
      if [[ -z $VERSION ]] && ! VERSION=$(default_runtime "$ACCELERATOR"); then
        die "no default runtime version for '$ACCELERATOR'; pass --version"
      fi
      ;;
  esac

  case $SUBCOMMAND in
    install | all)
      if [[ $INSTALL_FROM == local ]]; then
        git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
          die "$ROOT is not a git checkout; install from a wheel or requirement (--install-from)"
      elif [[ $INSTALL_FROM == *.whl ]]; then
        [[ -f $INSTALL_FROM ]] || die "--install-from: wheel '$INSTALL_FROM' not found"
        INSTALL_FROM=$(cd "$(dirname "$INSTALL_FROM")" && pwd)/$(basename "$INSTALL_FROM")
      elif [[ $INSTALL_FROM == /* || $INSTALL_FROM == .* ]]; then
        die "--install-from '$INSTALL_FROM': a local path must be a .whl file (or use 'local')"
      fi
      ;;
  esac

  case $SUBCOMMAND in
    train | all)
      [[ -n $WORKDIR ]] || die "$SUBCOMMAND needs --workdir (a gs:// path on pods)"
      if [[ $WORKDIR != gs://* ]]; then
        warn "--workdir '$WORKDIR' is not on gs://: on a pod every worker would write its own" \
          "local copy, checkpoints would not be shared, and delete erases them"
      fi
      local config_file=${CONFIG%%:*}
      [[ $config_file != /* ]] || die "--config must be a path inside this checkout, e.g. configs/vitb.py"
      [[ -f $ROOT/$config_file ]] || die "--config: '$config_file' not found in $ROOT"
      if [[ $INSTALL_FROM != local && $config_file != configs/* ]]; then
        die "--config must live in configs/ when installing from '$INSTALL_FROM' (only configs/ is shipped)"
      fi
      check_train_args "is not needed on TPU: the workers of a slice find each other"
      local b
      for b in "${MOUNT_BUCKETS[@]}"; do
        [[ $b =~ ^$BUCKET_PATTERN$ ]] || die "--mount-bucket '$b' is not a bucket name (no gs://, no path)"
      done
      data_buckets
      ;;
    *)
      if ((${#TRAIN_ARGS[@]})); then die "training arguments after '--' only go with train or all"; fi
      ;;
  esac
}

main() {
  SUBCOMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" INSTALL_FROM=local
  PYTHON_VERSION=3.11 CONFIG=configs/vitb.py WORKDIR="" LOG_WORKER=0
  DRY_RUN=0 NO_CHECK=0 QUEUED=0 SPOT=0 PREEMPTIBLE=0 FOREGROUND=0
  CREATE_ARGS=() ENV_VARS=() TRAIN_ARGS=() SCOPE=() MOUNT_BUCKETS=() GCSFUSE_ARGS=() GCS_BUCKETS=()
  STAGE="" TEARDOWN=0
  parse_args "$@"
  validate
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  "cmd_$SUBCOMMAND"
}

main "$@"
