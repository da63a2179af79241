#!/usr/bin/env bash
# Figure 4: Dreamer (random initial states), RndDreamer, DeepDreamer, ValDreamer and Offline (each day, then its 5 nights).
# Settings (ENVS, SEEDS, PRESET, WORKERS, OUT, DRY_RUN, BACKEND, KEEP_REPLAY) and arguments: benchmark/run.py.
exec "${PYTHON:-python}" "$(dirname "$0")/run.py" --figures fig4 -- "$@"
