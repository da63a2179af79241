#!/usr/bin/env bash
# Figures 3-5 at once: each (game, seed) day trained once, then its 7 distinct nights, then every plot.
# Settings (ENVS, SEEDS, PRESET, WORKERS, OUT, DRY_RUN, BACKEND, KEEP_REPLAY) and arguments: benchmark/run.py.
exec "${PYTHON:-python}" "$(dirname "$0")/run.py" --figures fig3 fig4 fig5 -- "$@"
