"""Figures 3-5, the results table, the generalization gap and an aggregate over games, from the benchmark's runs.

Reads the TensorBoard events of OUT/{game}/{method}/seed{S} (with tensorboard's own EventAccumulator) of the
runs that finished (a DONE marker, written by benchmark/run.py), says which are missing (with none, it says so
and exits 1), and writes to OUT/figures:

- fig3/fig4/fig5 .png and .pdf: one panel per game, `charts/test_return` against steps. The shared day curve
  once (from the day runs), then one line per method by night (from its night runs, from the day's end on),
  each method with its own colour, marker and dash (methods with equal curves stay visible), the day/night
  boundary as a dotted vertical line, the mean over seeds with a 95% confidence band (Student's t over seeds;
  with --smooth K / SMOOTH=K each seed's curve is first a trailing mean over K evaluations, default 1: none),
  and the score of a uniformly random policy dashed (measured, benchmark/random_score.py, cached in OUT).
- results.md: per game and method, the test return at the day's end and at the night's end (each the mean
  of that phase's last 10 epochs), mean ± 95% CI (t) over seeds, the change over the night (paired by
  seed), the train-minus-test gap at both ends, and how many seeds it has; missing runs are named. Then the
  final evaluation, where the runs have it (`final/*`: each phase's final agent on levels fixed by the seed, the
  same for a day and its nights): day, night and their change paired by seed. Then the paper's claims judged on
  those paired changes (held / not held / cannot tell), the diagnostics, and the aggregate over games.
- final.csv (and --csv PATH): one row per (game, method, seed) of the nights: the final evaluation of the day
  and of the night (with standard errors), on test and train levels, and each phase's mean of its last 10
  epochs; an empty field where a value is missing.
- gap.png/.pdf: train levels vs. test levels (`charts/train_levels_return` and `charts/test_return`) for one
  method per game, day then night: does the night narrow the gap, or raise both?
- aggregate.png/.pdf: the normalized test return at the night's end (the day's end for the day), over all
  games, (R - R_min) / (R_max - R_min) with ProcGen's easy-mode ranges (Cobbe et al. 2020, Appendix C); the
  interquartile mean with 95% stratified-bootstrap confidence intervals of rliable (Agarwal et al. 2021),
  over the seeds that every game has.

    python benchmark/plot.py --out runs/benchmark --envs coinrun --seeds 1 2 3 --figures fig3 fig4 fig5
"""

import argparse
import csv
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark.run import DAY, DONE, FIGURES, METHODS, methods_of, read_settings, run_dir, say  # noqa: E402

PAPER_FIGURES = ("fig3", "fig4", "fig5")  # drawn by default; FIGURES' "control" is no figure of the paper
PAPER_LEVELS = 200  # N, the paper's training levels: a regime of other N is named with the game

TEST, TRAIN = "charts/test_return", "charts/train_levels_return"
# the final evaluation, logged once at the end of each run's phase: on test levels and on train levels, with the
# standard errors of their means over episodes
FINAL = dict(test="final/test_return", test_se="final/test_return_se", train="final/train_levels_return",
             train_se="final/train_levels_return_se")
# the diagnostics: the day's world model on steps it has not trained on (open-loop prediction), and by night the
# dreams' imagined return beside the real test return
OPENLOOP = ("reward_error", "reward_recall", "end_recall", "cont_accuracy", "image_mse")
DREAM_RETURN = "dream/return_mean"
# how far each PPO update moves the policy, by day and by night
POLICY_MOVES = ("losses/approx_kl", "losses/clipfrac")
LAST = 10  # epochs averaged at the end of a phase
# ProcGen easy mode (R_min, R_max): Cobbe et al. 2020, "Leveraging Procedural Generation to Benchmark RL", App. C
EASY_RANGES = {"coinrun": (5, 10), "starpilot": (2.5, 64), "caveflyer": (3.5, 12), "dodgeball": (1.5, 19),
               "fruitbot": (-1.5, 32.4), "chaser": (0.5, 13), "miner": (1.5, 13), "jumper": (3, 10),
               "leaper": (3, 10), "maze": (5, 10), "bigfish": (1, 40), "heist": (3.5, 10), "climber": (2, 12.6),
               "plunder": (4.5, 30), "ninja": (3.5, 10), "bossfight": (0.5, 13)}
COLORS = {DAY: "tab:blue", "dreamer_random": "tab:green", "dreamer_collected": "tab:olive", "rnd": "tab:red",
          "deepdream": "tab:purple", "valdiv": "tab:orange", "full": "tab:brown", "offline": "lightskyblue",
          "control": "black"}
# (marker, dash) of each method, all distinct: lines of equal curves stay visible, in colour and in grey
STYLES = {DAY: ("", "-"), "dreamer_random": ("o", "-"), "dreamer_collected": ("s", "--"), "rnd": ("^", "-."),
          "deepdream": ("v", ":"), "valdiv": ("D", "--"), "full": ("P", "-."), "offline": ("X", ":"),
          "control": ("*", "-")}
MARKS = 6  # markers per line
LABELS = {DAY: "day (shared)", **{m: method.label for m, method in METHODS.items()}}
RANDOM = "random policy"
CSV_COLUMNS = ("game", "method", "seed", "day_final", "day_final_se", "night_final", "night_final_se",
               "day_train_final", "day_train_final_se", "night_train_final", "night_train_final_se", "day_last10",
               "night_last10", "num_levels")
METRICS = CSV_COLUMNS[3:13]  # the columns of returns
DAY_METRICS = tuple(c for c in METRICS if c.startswith("day_"))  # the same in every row of one day's nights


def read_run(path, tags=(TEST, TRAIN, *FINAL.values(), *(f"openloop/{k}" for k in OPENLOOP), DREAM_RETURN,
                         *POLICY_MOVES)):
    """{tag: (steps, values)} of a finished run (every scalar tag for tags=None), or None."""
    if not (path / DONE).exists():
        return None
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: tuple(np.array(x) for x in zip(*[(e.step, e.value) for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"] if tags is None or tag in tags}


def load(out, games, seeds, methods):
    """{(game, method): {seed: scalars}} over the finished runs (method DAY for the days)."""
    return {(g, m): {s: r for s in seeds if (r := read_run(run_dir(out, g, m, s))) is not None}
            for g in games for m in (DAY, *methods)}


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def unfinished(data, games, seeds, methods):
    """One line per game naming the runs that have not finished (left out), or none."""
    lines = []
    for game in games:
        absent = [f"{LABELS[m]} (seed{'s' * (len(gone) > 1)} {', '.join(map(str, gone))})"
                  for m in (DAY, *methods) if (gone := [s for s in seeds if s not in data[game, m]])]
        if absent:
            lines.append(f"not finished, left out: {game}: " + "; ".join(absent))
    return lines


def mean_ci(x):
    """Mean over axis 0 and the half-width of its 95% confidence interval (Student's t; NaN for one seed)."""
    x = np.asarray(x, float)
    n = len(x)
    half = stats.t.ppf(0.975, n - 1) * x.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1:], np.nan)
    return x.mean(axis=0), half


def phase(scalars, tag, lo, hi):
    """(steps, values) of `tag` with lo < step <= hi."""
    if tag not in scalars:
        return np.array([]), np.array([])
    steps, values = scalars[tag]
    keep = (steps > lo) & (steps <= hi)
    return steps[keep], values[keep]


def day_series(data, game, tag, end):
    """Per seed, the day's (steps, values) of `tag`."""
    return [phase(r, tag, -np.inf, end) for r in data[game, DAY].values()]


def night_series(data, game, method, tag, end):
    """Per seed, the night's (steps, values) of `tag` from the day's end on: the day's value there where the night
    has none (a night logs no train-levels return at the day's end), so that every night line starts there."""
    series = []
    for seed, night in data[game, method].items():
        steps, values = phase(night, tag, end - 1, np.inf)
        start = phase(data[game, DAY].get(seed, {}), tag, end - 1, end)
        if (not len(steps) or steps[0] != end) and len(start[0]):
            steps, values = np.concatenate([start[0], steps]), np.concatenate([start[1], values])
        series.append((steps, values))
    return series


def day_end(data, game, methods):
    """The day/night boundary: the last step of the day runs (the first of the nights if no day finished)."""
    days = [r[TEST][0].max() for r in data[game, DAY].values() if TEST in r]
    nights = [r[TEST][0].min() for m in methods for r in data[game, m].values() if TEST in r]
    return max(days) if days else min(nights, default=0)


def end_score(scalars, tag, lo, hi):
    values = phase(scalars, tag, lo, hi)[1]
    return values[-LAST:].mean() if len(values) else np.nan


def seed_scores(data, game, method, end):
    """{seed: dict(day=..., night=..., gap_day=..., gap_night=...)} for the seeds that have the day and the night."""
    days, nights = data[game, DAY], data[game, method]
    scores = {}
    for s in sorted(set(days) & set(nights)):
        test = (end_score(days[s], TEST, -np.inf, end), end_score(nights[s], TEST, end, np.inf))
        train = (end_score(days[s], TRAIN, -np.inf, end), end_score(nights[s], TRAIN, end, np.inf))
        scores[s] = dict(day=test[0], night=test[1], change=test[1] - test[0], gap_day=train[0] - test[0],
                         gap_night=train[1] - test[1])
    return scores


def fmt(values, digits=2):
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if not len(values):
        return "missing"
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 else "")


def smoothed(values, k):
    """The trailing moving average over k values (over those there are, at the start)."""
    total = np.cumsum(np.concatenate([[0.0], values]))
    i = np.arange(1, len(values) + 1)
    return (total[i] - total[np.maximum(i - k, 0)]) / np.minimum(i, k)


def curve(ax, series, smooth, label, color, marker="", linestyle="-", rank=(0, 1)):
    """Mean and 95% band over seeds of per-seed (steps, values), each a trailing mean over `smooth` values, on
    the steps every seed has. Markers are hollow, the larger the earlier the `rank` (i of n), and start at i/n of
    their spacing: lines of equal curves all show, their markers apart or one around another."""
    series = [(steps, smoothed(values, smooth)) for steps, values in series if len(steps)]
    if not series:
        return
    steps = sorted(set.intersection(*(set(p[0].tolist()) for p in series)))
    values = np.array([[dict(zip(*p))[step] for step in steps] for p in series])
    mean, half = mean_ci(values)
    every = max(1, len(steps) // MARKS)
    ax.plot(steps, mean, color=color, marker=marker, linestyle=linestyle, fillstyle="none", label=label,
            markersize=4 + 1.5 * (rank[1] - 1 - rank[0]), markevery=(rank[0] * every // rank[1], every))
    if len(series) > 1:
        ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)


def panels(games, title, smooth):
    """A figure with one panel per game, titled with what its lines and bands are."""
    fig, axes = plt.subplots(1, len(games), figsize=(4.5 * max(len(games), 2), 3.8), squeeze=False)
    fig.suptitle(f"{title}\nmean over seeds, band: 95% CI of the mean (Student's t over seeds)"
                 + (f"; each seed a trailing mean over {smooth} evaluations" if smooth > 1 else ""), fontsize=10)
    return fig, axes[0]


def legend(fig, axes, order):
    """One legend under the panels, its entries in `order` (the paper's), then any other; the figure."""
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    labels = list(dict.fromkeys([label for label in order if label in handles] + list(handles)))
    ncol = max(1, min(len(labels), 2 * len(axes) + 2))
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, (0.06 + 0.05 * ((len(labels) - 1) // ncol)) if labels else 0, 1, 1))
    return fig


def save(fig, path):
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}", dpi=150)
    plt.close(fig)


def style(method, rank=(0, 1)):
    marker, linestyle = STYLES[method]
    return dict(color=COLORS[method], marker=marker, linestyle=linestyle, rank=rank)


def draw_figure(name, data, games, ends, randoms, smooth):
    """Figure 3, 4 or 5; the figure, unsaved."""
    methods = FIGURES[name]
    title = f"Figure {name[-1]}" if name in PAPER_FIGURES else "The perfect-model control (not in the paper)"
    fig, axes = panels(games, f"{title}: test return on the full level distribution", smooth)
    for ax, game in zip(axes, games):
        curve(ax, day_series(data, game, TEST, ends[game]), smooth, LABELS[DAY], **style(DAY))
        for i, m in enumerate(methods):
            curve(ax, night_series(data, game, m, TEST, ends[game]), smooth, LABELS[m], **style(m, (i, len(methods))))
        ax.axvline(ends[game], color="k", linestyle=":", linewidth=1)
        ax.axhline(randoms[game], color="gray", linestyle="--", linewidth=1, label=RANDOM)
        ax.set(title=game, xlabel="steps (real by day, dreamed by night)", ylabel="test return")
    return legend(fig, axes, [LABELS[DAY], *(LABELS[m] for m in methods), RANDOM])


def draw_gap(data, games, ends, method, smooth):
    """Train vs. test levels, day then one method's night (both from the day's end); the figure, unsaved."""
    fig, axes = panels(games, f"Train levels (solid) vs. test levels (dashed): day, then {LABELS[method]} by night",
                       smooth)
    order = []
    for ax, game in zip(axes, games):
        for tag, linestyle, kind in ((TRAIN, "-", "train levels"), (TEST, "--", "test")):
            curve(ax, day_series(data, game, tag, ends[game]), smooth, f"{kind}, day", COLORS[DAY],
                  linestyle=linestyle)
            curve(ax, night_series(data, game, method, tag, ends[game]), smooth, f"{kind}, night", COLORS[method],
                  linestyle=linestyle)
            order += [f"{kind}, day", f"{kind}, night"]
        ax.axvline(ends[game], color="k", linestyle=":", linewidth=1)
        ax.set(title=game, xlabel="steps", ylabel="return")
    return legend(fig, axes, order)


def aggregate(scores, games, reps):
    """{method: (IQM, low, high, seeds)} of normalized scores over games, rliable's stratified bootstrap."""
    from rliable import library as rly
    from rliable import metrics
    matrices = {}
    for method, by_game in scores.items():
        seeds = sorted(set.intersection(*(set(by_game[g]) for g in games)))
        if seeds:
            matrices[method] = np.array([[(by_game[g][s] - EASY_RANGES[g][0]) / (EASY_RANGES[g][1] - EASY_RANGES[g][0])
                                          for g in games] for s in seeds])
    if not matrices:
        return {}
    point, interval = rly.get_interval_estimates(matrices, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    return {m: (point[m][0], interval[m][0, 0], interval[m][1, 0], len(matrices[m])) for m in matrices}


def draw_aggregate(result, games):
    """The aggregate's IQM and CI per method; the figure, unsaved."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(result) + 1.6))
    for i, (m, (iqm, low, high, n)) in enumerate(result.items()):
        ax.errorbar(iqm, i, xerr=[[iqm - low], [high - iqm]], fmt=STYLES[m][0] or "o", color=COLORS[m], capsize=4)
    ax.set_yticks(range(len(result)),
                  [f"{LABELS[m] if m != DAY else 'day'} ({plural(result[m][3], 'seed')})" for m in result])
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.invert_yaxis()
    ax.set(xlabel="normalized test return (easy-mode ranges)\nat the night's end (the day's end for the day)\n"
                  "IQM, 95% stratified-bootstrap CI", title=f"Aggregate over {', '.join(games)}")
    fig.tight_layout()
    return fig


def table(data, games, seeds, methods, ends, randoms):
    """The markdown table, and {method: {game: {seed: night-end score}}} (DAY: day-end) for the aggregate."""
    lines = [f"Test return on the full level distribution: each phase's end is the mean of its last {LAST} epochs; "
             "mean ± 95% CI (Student's t) over seeds; the change over the night and the train-minus-test gap are "
             "taken per seed.", ""]
    finals = {m: {} for m in (DAY, *methods)}
    for game in games:
        lines += [f"## {game} (random policy: {randoms[game]:.2f}; day ends at step {ends[game]:,})", "",
                  "| method | seeds | test, day's end | test, night's end | change over the night | "
                  "train − test, day's end | train − test, night's end |", "| --- | --- | --- | --- | --- | --- | --- |"]
        finals[DAY][game] = {s: end_score(r, TEST, -np.inf, ends[game]) for s, r in data[game, DAY].items()}
        for m in methods:
            scores = seed_scores(data, game, m, ends[game])
            finals[m][game] = {s: v["night"] for s, v in scores.items()}
            missing = [s for s in seeds if s not in scores]
            count = f"{len(scores)}/{len(seeds)}" + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
            cells = [fmt([v[k] for v in scores.values()]) for k in ("day", "night", "change", "gap_day", "gap_night")]
            lines.append(f"| {LABELS[m]} | {count} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines, finals


def final(scalars, key):
    """The run's final evaluation `key` (of FINAL), NaN if it has none."""
    return float(scalars[FINAL[key]][1][-1]) if FINAL[key] in scalars else np.nan


def levels_of(out, game, seed):
    """The training levels N of a (game, seed)'s day: its command's last --num-levels (DONE), else the paper's."""
    try:
        cmd = json.loads((run_dir(out, game, DAY, seed) / DONE).read_text()).get("cmd", [])
    except (OSError, ValueError, AttributeError):
        cmd = []
    given = [cmd[i + 1] for i, flag in enumerate(cmd[:-1]) if flag == "--num-levels"]
    return int(given[-1]) if given else PAPER_LEVELS


def final_rows(data, games, seeds, methods, ends, out):
    """One dict per (game, method, seed) of the nights whose day has finished (its N known), with CSV_COLUMNS: NaN
    where a value is missing."""
    rows = []
    for game in games:
        for m in methods:
            for s in (s for s in seeds if s in data[game, DAY]):
                day, night = data[game, DAY][s], data[game, m].get(s, {})
                values = {f"{when}_{levels}final{se}": final(run, key + se)  # e.g. day_train_final_se
                          for when, run in (("day", day), ("night", night))
                          for levels, key in (("", "test"), ("train_", "train")) for se in ("", "_se")}
                rows.append(dict(game=game, method=m, seed=s, **values,
                                 day_last10=end_score(day, TEST, -np.inf, ends[game]),
                                 night_last10=end_score(night, TEST, ends[game], np.inf),
                                 num_levels=levels_of(out, game, s)))
    return rows


def regime(row):
    """The game, and its N training levels where they are not the paper's 200: one table block and panel each."""
    n = int(row["num_levels"])
    return row["game"] if n == PAPER_LEVELS else f"{row['game']}, {n} levels"


def ordered(rows):
    """The rows by regime (in their first order), then method in METHODS' order, then seed: every game's table lists
    the methods in one order."""
    regimes = list(dict.fromkeys(map(regime, rows)))
    return sorted(rows, key=lambda r: (regimes.index(regime(r)), list(METHODS).index(r["method"]), r["seed"]))


def paired(rows, key, day, night):
    """[(day, night)] of the rows of (regime, method) `key` that have both values."""
    return np.array([(r[day], r[night]) for r in rows if (regime(r), r["method"]) == key
                     and not np.isnan(r[day]) and not np.isnan(r[night])]).reshape(-1, 2)


def final_table(rows):
    """The markdown table of the final evaluation: day, night and their change paired by seed, on test and train
    levels, and the gap (train levels - test) with its change; one line instead where no run has it."""
    if all(np.isnan(r[c]) for r in rows for c in METRICS[:8]):
        return ["No run has the final evaluation (the `final/*` scalars: these runs are older than it).", ""]
    lines = ["Each phase's final agent on many episodes of levels fixed by the seed alone, the same for the day and "
             "its nights; mean ± 95% CI (Student's t) over the seeds that have both; the change is night − day, "
             "paired by seed. The gap is the train-levels return minus the test return: a night that closes it "
             "either raises the test return or loses the training levels. Per seed: final.csv.", "",
             "| game | method | seeds | test: day final | test: night final | test: paired change | "
             "train levels: day final | train levels: night final | train levels: paired change | "
             "gap: day final | gap: night final | gap: paired change | seeds to find a test change of 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in dict.fromkeys((regime(r), r["method"]) for r in ordered(rows)):
        test, train = (paired(rows, key, f"day_{k}final", f"night_{k}final") for k in ("", "train_"))
        both = [r for r in rows if (regime(r), r["method"]) == key]
        gap = paired([dict(r, day_gap=r["day_train_final"] - r["day_final"],
                           night_gap=r["night_train_final"] - r["night_final"]) for r in both],
                     key, "day_gap", "night_gap")
        cells = [fmt(x) for pairs in (test, train, gap) for x in (pairs[:, 0], pairs[:, 1], pairs[:, 1] - pairs[:, 0])]
        needed = seeds_needed(test[:, 1] - test[:, 0])
        cells.append("missing" if np.isnan(needed) else str(needed))
        count = str(len(test)) + (f" ({len(train)} on train levels)" if len(train) != len(test) else "")
        lines.append(f"| {key[0]} | {LABELS[key[1]]} | {count} | " + " | ".join(cells) + " |")
    return lines + ["", "The last column: the seeds a paired test change of 1 point needs (95% confidence, 80% power, "
                    "Student's t) with the spread of the changes seen here.", ""]


DREAMERS = ("rnd", "deepdream", "valdiv")  # the paper's three variants, "our variants" of its claims
# The paper's claims on the sparse games (Section 5.3, Figures 3-4), each as comparisons of final test returns paired
# by seed: (claim, [(comparison, the method measured, what it is measured against)], the gain a night must show).
CLAIMS = (("The nights raise the test return above the day's end (Fig. 4)",
           [(f"{LABELS[m]} − day", m, DAY) for m in (*DREAMERS, "full", "dreamer_random")], 1.0),
          ("The dreamers beat plain imagination by a small margin (Fig. 4)",
           [(f"{LABELS[m]} − {LABELS['dreamer_random']}", m, "dreamer_random") for m in DREAMERS], 0.0),
          ("Offline gives part (about half) of the dreamers' gain (Fig. 4)",
           [("Offline − day", "offline", DAY), ("the three dreamers' mean − Offline", DREAMERS, "offline")], 0.0),
          ("Random initial states beat collected ones (Fig. 3)",
           [(f"{LABELS['dreamer_random']} − {LABELS['dreamer_collected']}", "dreamer_random", "dreamer_collected")],
           0.0))


def p_value(changes, against=0.0):
    """Student's t two-sided p-value of a mean change equal to `against` (NaN with under two changes)."""
    changes = np.asarray(changes, float)
    if len(changes) < 2:
        return np.nan
    if changes.std(ddof=1) == 0:  # no spread: the interval is the mean alone
        return float(changes.mean() == against)
    return float(stats.ttest_1samp(changes, against).pvalue)


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (a NaN stays NaN and does not count)."""
    p = np.asarray(pvalues, float)
    adjusted, running = np.full(len(p), np.nan), 0.0
    order = [i for i in np.argsort(p) if not np.isnan(p[i])]
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(changes, gain=0.0, p=None, p_gain=None):
    """The claim of a positive change: held when its mean is above 0 at p < 0.05, not held when below (a loss) or,
    with gain > 0, below `gain` at p_gain < 0.05; else cannot tell. `p`, `p_gain`: two-sided p-values against 0 and
    `gain` (corrected for the comparisons made; by default uncorrected, the 95% interval's verdict)."""
    changes = np.asarray(changes, float)
    if len(changes) < 2:
        return "cannot tell (one seed)" if len(changes) else "missing"
    p = p_value(changes) if p is None else p
    p_gain = p_value(changes, gain) if p_gain is None and gain else p_gain
    if p < 0.05:
        return "held" if changes.mean() > 0 else "not held (a loss)"
    if gain and p_gain < 0.05 and changes.mean() < gain:
        return f"not held (no gain of {gain:g})"
    return "cannot tell"


def claims_table(rows):
    """The CLAIMS judged per game (and regime) on the final evaluation's test returns: each comparison's change paired
    by seed, mean ± 95% CI over the seeds that have both sides, and its verdict, corrected for the game's number of
    tests (Holm) and uncorrected."""
    day = {(regime(r), r["seed"]): r["day_final"] for r in rows if not np.isnan(r["day_final"])}
    night = {(regime(r), r["method"], r["seed"]): r["night_final"] for r in rows}

    def value(game, method, seed):
        """The seed's final test return of the day, of a night, or the mean of several nights'."""
        if isinstance(method, tuple):
            return np.mean([value(game, m, seed) for m in method])
        return day.get((game, seed), np.nan) if method == DAY else night.get((game, method, seed), np.nan)

    lines = ["Each comparison is a change of the final test return paired by seed (the same 500 levels), mean ± 95% CI "
             "(Student's t, uncorrected) over the seeds that have both sides. Verdict: held when the change is above 0 "
             "at p < 0.05, not held when below 0 (a loss) or, for the nights' own gain, below 1 point (the gain the "
             "study is sized to find); otherwise cannot tell. Holm: the p-values corrected for every test of the "
             "game (each comparison against 0, each night's gain against 1); beside it the uncorrected verdict, "
             "the 95% interval's.", "",
             "| game | claim | comparison | seeds | change | p (Holm) | verdict (Holm) | verdict (uncorrected) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for game in dict.fromkeys(regime(r) for r in ordered(rows)):
        seeds = sorted({r["seed"] for r in rows if regime(r) == game})
        tests = [(claim, name, gain, [c for s in seeds if not np.isnan(c := value(game, method, s)
                                                                        - value(game, against, s))])
                 for claim, comparisons, gain in CLAIMS for name, method, against in comparisons]
        corrected = holm([p_value(c) for *_, c in tests] + [p_value(c, g) for _, _, g, c in tests if g])
        p0, p_gain = corrected[:len(tests)], iter(corrected[len(tests):])
        for (claim, name, gain, changes), p in zip(tests, p0):
            pg = next(p_gain) if gain else None
            shown = "" if np.isnan(p) else f"{p:.3f}" + (f"; {pg:.3f} against {gain:g}" if gain and not np.isnan(pg)
                                                           else "")
            lines.append(f"| {game} | {claim} | {name} | {len(changes)} | {fmt(changes)} | {shown or '-'} | "
                         f"{verdict(changes, gain, p, pg)} | "
                         f"{verdict(changes, gain)} |")
    return lines + [""]


def seeds_needed(changes, delta=1.0, power=0.8):
    """The seeds a paired change of `delta` needs to be found at 95% confidence with `power`, with the spread of
    `changes` (Student's t, two-sided): the least n with (t_0.975 + t_power; n - 1) sd / sqrt(n) <= delta."""
    changes = np.asarray(changes, float)
    if len(changes) < 2:
        return np.nan
    sd = changes.std(ddof=1)
    return next(n for n in range(2, 10**6) if (stats.t.ppf(0.975, n - 1) + stats.t.ppf(power, n - 1)) * sd
                / np.sqrt(n) <= delta)


def diagnostics_table(data, games, methods, ends):
    """The world model at the day's end (open-loop prediction, the mean of the last LAST day epochs); per night, the
    dreams' imagined return and the real test return over its first and its last LAST epochs, and how far its PPO
    updates move the policy beside the day's; per seed, then mean ± 95% CI over seeds."""
    lines = ["The day's world model on steps it has not trained on yet (open-loop: burn-in filtered, then H steps "
             f"predicted with the real actions), the mean of the last {LAST} day epochs:", "",
             "| game | seeds | reward error | recall of real rewards | recall of real ends | continuation accuracy | "
             "image MSE |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for game in games:
        days = data[game, DAY].values()
        cells = [fmt([end_score(r, f"openloop/{k}", -np.inf, ends[game]) for r in days]) for k in OPENLOOP]
        lines.append(f"| {game} | {len(days)} | " + " | ".join(cells) + " |")
    lines += ["", f"By night, the dreams' imagined return (`{DREAM_RETURN}`) beside the real test return, each the mean "
              f"of the night's first and of its last {LAST} epochs: a dream return that rises while the real one "
              "does not is the agent exploiting the world model.", "",
              "| game | method | seeds | dream return, first | dream return, last | real test return, first | "
              "real test return, last |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += night_rows(data, games, methods, DREAM_RETURN, lambda game, days, nights: [
        fmt([phase(r, tag, ends[game], np.inf)[1][which].mean() for r in nights])
        for tag in (DREAM_RETURN, TEST) for which in (slice(0, LAST), slice(-LAST, None))])
    lines += ["", f"How far each PPO update moves the policy: the approximate KL between the policy before and after "
              f"(`{POLICY_MOVES[0]}`) and the share of clipped ratios (`{POLICY_MOVES[1]}`), the day's last {LAST} "
              "epochs beside each night's mean over all its epochs, over the seeds that have both:", "",
              "| game | method | seeds | approx. KL, day | approx. KL, night | clip fraction, day | "
              "clip fraction, night |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += night_rows(data, games, methods, POLICY_MOVES[0], lambda game, days, nights: [
        fmt([end_score(r, tag, -np.inf, ends[game]) for r in days] if who == DAY else
            [phase(r, tag, ends[game], np.inf)[1].mean() for r in nights], digits=4)
        for tag in POLICY_MOVES for who in (DAY, "night")])
    return lines + [""]


def night_rows(data, games, methods, tag, cells):
    """A table row per game and night method over the seeds whose night logged `tag` and whose day finished:
    `cells(game, their days' scalars, their nights' scalars)` after the game, the method and the seed count."""
    lines = []
    for game in games:
        for m in methods:
            seeds = [s for s, r in data[game, m].items() if tag in r and s in data[game, DAY]]
            if seeds:
                days, nights = ([data[game, who][s] for s in seeds] for who in (DAY, m))
                lines.append(f"| {game} | {LABELS[m]} | {len(seeds)} | " + " | ".join(cells(game, days, nights)) + " |")
    return lines


def write_csv(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and np.isnan(v) else f"{v:.6g}" if isinstance(v, float)
                          else v for k, v in r.items()} for r in rows)


def read_csv_rows(paths):
    """The rows of final.csv files (an empty field is NaN; a file without num_levels, older than it, has the paper's
    200); a later file's row replaces an earlier one of the same (game, method, seed, num_levels). A file that is not
    such a CSV is refused in one line, naming it, and so are a seed's nights paired with two different days (its day
    redone, on another CPU say, for some of its nights only)."""
    rows, source = {}, {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if missing := [c for c in CSV_COLUMNS[:-1] if c not in (reader.fieldnames or ())]:
                sys.exit(f"--from-csv {path}: not a final.csv of benchmark/plot.py (no column {', '.join(missing)})")
            for r in reader:
                if r["method"] not in METHODS:
                    sys.exit(f"--from-csv {path}: method {r['method']!r} is none of {', '.join(METHODS)}")
                row = dict(game=r["game"], method=r["method"], seed=int(r["seed"]),
                           **{c: float(r[c]) if r[c] else np.nan for c in METRICS},
                           num_levels=int(r.get("num_levels") or PAPER_LEVELS))
                key = row["game"], row["method"], row["seed"], row["num_levels"]
                rows[key], source[key] = row, path
    first = {}  # (game, seed, num_levels): the key of its first row, whose day every other row must have
    for key, row in rows.items():
        k = first.setdefault((key[0], *key[2:]), key)
        if c := next((c for c in DAY_METRICS if not np.array_equal(rows[k][c], row[c], equal_nan=True)), None):
            sys.exit(f"--from-csv: {key[0]} seed {key[2]} ({key[3]} levels) has nights of two different days: {c} "
                     f"{rows[k][c]:g} in {k[1]}'s row ({source[k]}), {row[c]:g} in {key[1]}'s ({source[key]}); "
                     "redo the seed's nights from one day, or leave the other day's rows out")
    return list(rows.values())


def draw_paired(rows):
    """The paired changes night − day of the final evaluation, per method: each seed's change a dot, the mean and
    its 95% CI a bar; one column of panels per game and regime, the test return above, the gap below. The figure,
    unsaved (None without any change)."""
    rows = ordered(rows)
    regimes = list(dict.fromkeys(map(regime, rows)))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    measures = (("test return: night − day", lambda r, when: r[f"{when}_final"]),
                ("gap (train − test): night − day", lambda r, when: r[f"{when}_train_final"] - r[f"{when}_final"]))
    fig, axes = plt.subplots(2, len(regimes), figsize=(4.2 * len(regimes), 0.45 * len(methods) * 2 + 2.5),
                             squeeze=False, sharey=True)
    drawn = False
    for col, game in enumerate(regimes):
        for ax, (label, measure) in zip(axes[:, col], measures):
            for i, m in enumerate(methods):
                changes = np.array([measure(r, "night") - measure(r, "day") for r in rows
                                    if (regime(r), r["method"]) == (game, m)])
                changes = changes[~np.isnan(changes)]
                if not len(changes):
                    continue
                drawn = True
                ax.plot(changes, np.full(len(changes), i) + np.linspace(-0.15, 0.15, len(changes)), "o",
                        color=COLORS[m], alpha=0.5, markersize=4)
                mean, half = mean_ci(changes)
                ax.errorbar(mean, i, xerr=0 if np.isnan(half) else half, fmt="|", color="k", capsize=4,
                            markersize=12)
            ax.axvline(0, color="gray", linestyle="--", linewidth=1)
            ax.set(title=game if label.startswith("test") else "", xlabel=label)
    axes[0, 0].set_yticks(range(len(methods)), [LABELS[m] for m in methods])
    axes[0, 0].invert_yaxis()
    title = "Final evaluation, night − day paired by seed: each seed a dot, the mean and its 95% CI (Student's t) a bar"
    fig.suptitle(textwrap.fill(title, 12 * 4 * len(regimes)), fontsize=10)  # about 12 characters an inch
    fig.tight_layout()
    return fig if drawn else plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmark")
    p.add_argument("--envs", nargs="+", help="instead of ENVS (default: coinrun caveflyer chaser plunder)")
    p.add_argument("--seeds", nargs="+", help="instead of SEEDS (default: 1 2 3 4 5)")
    p.add_argument("--smooth", help="instead of SMOOTH: each seed's curve a trailing mean over this many evaluations "
                                    "(default 1: none)")
    p.add_argument("--figures", nargs="+", choices=FIGURES, default=list(PAPER_FIGURES),
                   help="the figures (default fig3 fig4 fig5; control: the perfect-model control's)")
    p.add_argument("--gap-method", choices=METHODS, default="dreamer_random",
                   help="the method whose nights the generalization-gap figure shows")
    p.add_argument("--random-episodes", type=int, default=100)
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples of the aggregate's CIs")
    p.add_argument("--csv", type=Path, help="also write final.csv here (e.g. under docs/)")
    p.add_argument("--from-csv", nargs="+", type=Path, metavar="CSV",
                   help="no runs: print the final evaluation's table and the claims from these final.csv files (a "
                        "later file's row of the same game, method, seed and levels wins); with --csv, write their "
                        "rows there")
    p.add_argument("--paired", type=Path, metavar="PATH", help="with --from-csv: draw the paired changes to PATH.png "
                                                               "and PATH.pdf")
    args = read_settings(p.parse_args(argv), ("envs", "seeds", "smooth"))
    if args.from_csv:
        rows = read_csv_rows(args.from_csv)
        if args.csv:
            write_csv(rows, args.csv)
        if args.paired and (fig := draw_paired(rows)):
            save(fig, args.paired)
        say("\n".join([f"Read from {', '.join(map(str, args.from_csv))}.", "", "## Final evaluation", "",
                       *final_table(rows), "## The paper's claims", "", *claims_table(rows)]))
        return 0
    methods = methods_of(args.figures)
    data = load(args.out, args.envs, args.seeds, methods)
    if not any(data.values()):
        print(f"nothing to plot: no run in {args.out} has finished (games {' '.join(args.envs)}, seeds "
              f"{' '.join(map(str, args.seeds))})", file=sys.stderr)
        return 1
    for line in unfinished(data, args.envs, args.seeds, methods):
        say(line)
    from benchmark.random_score import cached_random_scores  # imports the scripts (torch): only when plotting

    ends = {g: day_end(data, g, methods) for g in args.envs}
    randoms = cached_random_scores(args.out, args.envs, args.random_episodes)
    figures = Path(args.out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in args.figures:
        save(draw_figure(name, data, args.envs, ends, randoms, args.smooth), figures / name)
    gap_method = args.gap_method if args.gap_method in methods else methods[0]
    save(draw_gap(data, args.envs, ends, gap_method, args.smooth), figures / "gap")
    lines, finals = table(data, args.envs, args.seeds, methods, ends, randoms)
    lines = [f"Read from the runs in {args.out}.", "", *lines]
    rows = final_rows(data, args.envs, args.seeds, methods, ends, args.out)
    for path in (figures / "final.csv", *([args.csv] if args.csv else [])):
        write_csv(rows, path)
    if fig := draw_paired(rows):
        save(fig, figures / "paired")
    lines += ["## Final evaluation (the same levels for the day and its nights)", "", *final_table(rows)]
    lines += ["## The paper's claims", "", *claims_table(rows)]
    lines += ["## Diagnostics", "", *diagnostics_table(data, args.envs, methods, ends)]
    result = aggregate(finals, args.envs, args.reps)
    if result:
        save(draw_aggregate(result, args.envs), figures / "aggregate")
    lines += [f"## Aggregate over {', '.join(args.envs)}", "",
              "Normalized test return (R − R_min) / (R_max − R_min), ProcGen's easy-mode ranges; the night's end (the "
              "day's end for the day); interquartile mean and 95% stratified-bootstrap CI (rliable, "
              f"{args.reps} resamples) over the seeds every game has.", "", "| method | seeds | IQM | 95% CI |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {LABELS[m]} | {result[m][3]} | {result[m][0]:.3f} | [{result[m][1]:.3f}, {result[m][2]:.3f}] |"
              if m in result else f"| {LABELS[m]} | 0 | missing | missing |" for m in (DAY, *methods)]
    (figures / "results.md").write_text("\n".join(lines) + "\n")
    say(f"figures, results.md and final.csv in {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
