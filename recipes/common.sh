# recipes/common.sh -- what both recipes do around their stages (sourced, after their settings).
#
#   run SCRIPT ARGS...   a stage in one process, or in NPROC processes under torchrun (one a GPU;
#                        stage.py's torchrun helpers)
#   todo PATH            true if PATH does not exist yet: a stage whose output exists is skipped, so running
#                        a recipe again continues it
#   prepare DIR ARGS...  scale/prepare.py ARGS... --out_dir DIR, unless DIR exists: a data set from the hub
#                        (or a local copy) in the canonical form the stages read (one process, on the CPU)
#   per_process NAME...  checks that each accumulation NAME is a multiple of NPROC: --batch_size is one
#                        process's micro-batch, so with NPROC processes a step keeps BATCH x ACCUM examples
#                        by giving each process ACCUM / NPROC micro-batches

run() {
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else
    "$PYTHON" "$@"
  fi
}

todo() { [ ! -e "$1" ] || { echo "== $1 exists, skipped"; return 1; }; }

prepare() {
  local out=$1
  shift
  if todo "$out"; then
    "$PYTHON" -m scale.prepare "$@" --out_dir "$out"
  fi
}

per_process() {
  local name
  for name in "$@"; do
    if (( ${!name} % NPROC )); then
      echo "error: $name=${!name} is not a multiple of NPROC=$NPROC" >&2
      exit 2
    fi
  done
}
