"""The dreamer_ppo*.py scripts repeat their code on purpose (one self-contained file per method). Each is
a sequence of blocks opened by a `# %% name` line; a block that two scripts share must be identical."""
import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("dreamer_ppo*.py"))
MARK = re.compile(r"^\s*# %% (.+?)\s*$")
VARIANT_BLOCKS = ("docstring", "transformation args", "transformation")  # what makes each variant itself


def blocks(path):
    """{block name: its lines}; the lines before the first mark are the block 'docstring'."""
    found, name, lines = {}, "docstring", []
    for line in pathlib.Path(path).read_text().splitlines():
        mark = MARK.match(line)
        if mark:
            assert mark.group(1) not in found, f"{path}: block {mark.group(1)!r} appears twice"
            found[name], name, lines = lines, mark.group(1), []
        else:
            lines.append(line)
    found[name] = lines
    return found


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
        assert {"imports", "args", "checks", "maths", "world model", "dataset", "agent", "evaluation",
                "checkpoint", "day", "main"} <= names, f"{script.name} lacks blocks"


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
