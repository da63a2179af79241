"""The score of a uniformly random policy on a game's test distribution: the dashed line of the figures.

Measured as the scripts' evaluate() measures an agent: the first episode of each of `episodes` fresh test
environments (the full level distribution, easy mode), played side by side, so that short episodes are not
over-counted. Cached in OUT/random_scores.json.

    python benchmark/random_score.py coinrun chaser --episodes 100
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dreamer_ppo import make_env  # noqa: E402  (the scripts' own environments)


def random_policy_score(game, episodes=100, seed=0):
    envs = make_env(game, episodes, 0, seed)
    rng = np.random.default_rng(seed)
    envs.reset()
    score, first_scores = np.zeros(episodes), np.full(episodes, np.nan)
    while np.isnan(first_scores).any():
        _, reward, done, _ = envs.step(rng.integers(envs.action_space.n, size=episodes))
        score += reward
        first_end = done & np.isnan(first_scores)
        first_scores[first_end] = score[first_end]
        score[done] = 0.0
    envs.close()
    return float(first_scores.mean())


def cached_random_scores(out, games, episodes=100):
    """{game: score}, measured once per game and number of episodes and kept in OUT/random_scores.json."""
    path = Path(out) / "random_scores.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    missing = [g for g in games if cache.get(g, {}).get("episodes") != episodes]
    for game in missing:
        cache[game] = dict(episodes=episodes, score=random_policy_score(game, episodes))
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return {g: cache[g]["score"] for g in games}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("games", nargs="+")
    p.add_argument("--episodes", type=int, default=100)
    a = p.parse_args()
    for g in a.games:
        print(f"{g}: {random_policy_score(g, a.episodes):.2f} ({a.episodes} episodes)")
