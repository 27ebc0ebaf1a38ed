# Shell helpers both launchers source (tpu_pod.sh, slurm_gpu.sh). Not a script of its own.
# shellcheck shell=bash

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
