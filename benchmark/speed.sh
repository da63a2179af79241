#!/usr/bin/env bash
# The per-phase speed of one script: a few day and night epochs at full size, then the table of its time/* scalars.
# Settings (SCRIPT, EPOCHS, OUT) and arguments (passed to the script, e.g. size flags on a CPU): benchmark/speed.py.
exec "${PYTHON:-python}" "$(dirname "$0")/speed.py" "$@"
