# Shell helpers both launchers source (tpu_pod.sh, slurm_gpu.sh). Not a script of its own.
# shellcheck shell=bash

# Written for bash >= 4.4 (arrays that may be empty under `set -u`); checked here, where both
# launchers pass first. Nothing above this line may need more than bash 3.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "${0##*/}: needs bash >= 4.4 (this is ${BASH_VERSION}; on macOS: brew install bash)" >&2
  exit 2
fi

die() { # a usage error: say what is wrong and how to get help
  echo "${0##*/}: error: $*" >&2  # $0: the launcher that sourced this file
  echo "run 'launch/${0##*/} -h' for usage" >&2
  exit 2
}

# Prints its arguments as one line that a POSIX shell reads back as the same words. Used for the
# printed commands (copy-pasteable) and for command lines sent elsewhere (TPU workers, sbatch files).
quote() {
  local words=() w flag
  for w in "$@"; do
    flag=""
    if [[ $w =~ ^--[A-Za-z0-9_.-]+= ]]; then # --flag='value' reads better than '--flag=value'
      flag=${BASH_REMATCH[0]}
      w=${w#"$flag"}
    fi
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$flag$w")
    else
      words+=("$flag'${w//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${words[*]}"
}

# The option loop both launchers share. `parse_options FLAGS VALUED "$@"`: FLAGS and VALUED are the
# launcher's option names (space-separated) that take no value and one value (`--opt=v` or `--opt v`).
# Each option found is handed to the launcher's own `set_option NAME VALUE`; everything after `--`
# goes to TRAIN_ARGS; -h / --help prints the launcher's `usage`. Anything else is one `die` line.
parse_options() {
  local flags=" $1 " valued=" $2 " opt value has_value
  shift 2
  while (($#)); do
    opt=$1
    shift
    value=""
    has_value=0
    if [[ $opt == --*=* ]]; then
      value=${opt#*=}
      opt=${opt%%=*}
      has_value=1
    fi
    if [[ $opt == -- ]]; then
      # shellcheck disable=SC2034  # read by the launcher that sourced this file
      TRAIN_ARGS=("$@")
      return
    elif [[ $opt == -h || $opt == --help ]]; then
      usage
      exit 0
    elif [[ $flags == *" $opt "* ]]; then
      if ((has_value)); then die "$opt takes no value"; fi
    elif [[ $valued == *" $opt "* ]]; then
      if ((!has_value)); then
        if (($# == 0)); then die "$opt needs a value"; fi
        value=$1
        shift
      fi
    else
      die "unknown option '$opt' (training arguments go after '--')"
    fi
    set_option "$opt" "$value"
  done
}

# Refuses training arguments (after `--`) that the launcher sets itself; $1 ends the line said for
# the multi-process flags (why they are not the user's to give).
check_train_args() {
  local arg
  for arg in "${TRAIN_ARGS[@]}"; do
    case $arg in
      --config | --config=* | --workdir | --workdir=*)
        die "pass ${arg%%=*} to the launcher (before '--'), not to training" ;;
      --coordinator_address* | --num_processes* | --process_id*)
        die "'${arg%%=*}' $1" ;;
    esac
  done
}
