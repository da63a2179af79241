#!/usr/bin/env bash
# Figure 5: RndDreamer, DeepDreamer, ValDreamer and FullDreamer (each day, then its 4 nights).
# Settings (ENVS, SEEDS, PRESET, WORKERS, OUT, DRY_RUN, BACKEND, KEEP_REPLAY) and arguments: benchmark/run.py.
exec "${PYTHON:-python}" "$(dirname "$0")/run.py" --figures fig5 -- "$@"
