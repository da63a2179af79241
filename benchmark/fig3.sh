#!/usr/bin/env bash
# Figure 3: the Dreamer baseline's night from random vs. collected initial states (each day, then its 2 nights).
# Settings (ENVS, SEEDS, PRESET, WORKERS, OUT, DRY_RUN, BACKEND, KEEP_REPLAY) and arguments: benchmark/run.py.
exec "${PYTHON:-python}" "$(dirname "$0")/run.py" --figures fig3 -- "$@"
