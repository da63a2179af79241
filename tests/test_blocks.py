"""The dreamer_ppo*.py scripts repeat their code on purpose (one self-contained file per method). Each is
a sequence of blocks opened by a `# %% name` line; a block that two scripts share must be identical."""
import itertools
import pathlib

from tools.sync_blocks import ROOT, VARIANT_BLOCKS, blocks, split, synced

SCRIPTS = sorted(ROOT.glob("dreamer_ppo*.py"))


def drifted(paths):
    """(block, file, file) for every block that two of `paths` share with different contents."""
    parsed = {p: blocks(p) for p in paths}
    return [(name, pathlib.Path(a).name, pathlib.Path(b).name)
            for a, b in itertools.combinations(paths, 2)
            for name in parsed[a].keys() & parsed[b].keys()
            if name not in VARIANT_BLOCKS and parsed[a][name] != parsed[b][name]]


def test_scripts_are_made_of_the_named_blocks():
    assert ROOT / "dreamer_ppo.py" in SCRIPTS
    for script in SCRIPTS:
        names = set(blocks(script))
        assert {"imports", "hyperparameters", "maths", "world model", "dataset", "agent", "evaluation", "day",
                "run flags", "checks", "checkpoint", "logging", "main"} <= names, f"{script.name} lacks blocks"


def test_the_method_comes_before_the_harness():
    # A reader who stops at the harness's line has read the whole method: no harness block comes before it.
    for script in SCRIPTS:
        names = list(blocks(script))
        assert names.index("night" if "night" in names else "offline night") + 1 == names.index("run flags")
        assert (ROOT / script).read_text().split("\n# %% run flags\n")[1].split("\n")[0].count("The harness"), script


def test_shared_blocks_are_identical():
    drifts = drifted(SCRIPTS)
    assert not drifts, "\n".join(f"block {name!r} differs between {a} and {b}" for name, a, b in drifts)


def test_a_drifted_block_is_caught(tmp_path):
    original = (ROOT / "dreamer_ppo.py").read_text()
    changed = original.replace("def symlog(x):\n    return", "def symlog(x):\n    return 2 *", 1)
    assert changed != original
    (tmp_path / "dreamer_ppo.py").write_text(original)
    (tmp_path / "dreamer_ppo_fork.py").write_text(changed)
    assert drifted([tmp_path / "dreamer_ppo.py", tmp_path / "dreamer_ppo_fork.py"]) == [
        ("maths", "dreamer_ppo.py", "dreamer_ppo_fork.py")]


def test_sync_copies_a_shared_block_and_leaves_the_variant_blocks():
    base = (ROOT / "dreamer_ppo.py").read_text()
    variant = (ROOT / "dreamer_ppo_valdiv.py").read_text()
    edited = base.replace("def symlog(x):\n    return", "def symlog(x):\n    return 2 *", 1)
    out = synced(edited, variant)
    assert "def symlog(x):\n    return 2 *" in out
    assert "def value_diversification" in out and out.startswith('"""ValDreamer')
    assert synced(base, variant) == variant


def test_sync_adds_a_new_block_where_asked_before_the_block_that_follows_it():
    base = (ROOT / "dreamer_ppo.py").read_text()
    offline = (ROOT / "dreamer_ppo_offline.py").read_text()
    edited = base.replace("\n# %% main\n", "\n# %% new block\ndef new_thing():\n    pass\n\n\n# %% main\n", 1)
    assert synced(edited, offline) == offline  # a block the script lacks is not added unasked
    names = [n for n, _ in split(synced(edited, offline, add=["new block"]))]
    assert names.index("new block") + 1 == names.index("main") and names.count("new block") == 1
    assert synced(edited, synced(edited, offline, add=["new block"]), add=["new block"]) == synced(
        edited, offline, add=["new block"])  # added once
