"""Copy the shared blocks of one dreamer_ppo*.py script into the others, so that an edit is made once.

The scripts repeat their code on purpose (one self-contained file per method): each is a sequence of blocks
opened by a `# %% name` line, and a block that two scripts share must be identical (tests/test_blocks.py).
Edit a shared block in one script, then run

    python tools/sync_blocks.py                      # from dreamer_ppo.py into every other script
    python tools/sync_blocks.py --source dreamer_ppo_offline.py --check
    python tools/sync_blocks.py --add "videos"        # a new block, into every script, where the source has it

A block is copied into a script only where that script has a block of the same name, or is named by --add: then
it goes in before the first block after it in the source that the script has (a new block need not belong to
every script: "dream videos" has no place in the Offline script). The blocks that make each variant itself
(VARIANT_BLOCKS) are never copied. --check only lists what would change (exit 1 if any).
"""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = re.compile(r"^\s*# %% (.+?)\s*$")
VARIANT_BLOCKS = ("docstring", "transformation args", "transformation")  # what makes each variant itself


def split(text):
    """[(block name, its lines)] in file order; the lines before the first mark are the block 'docstring'.
    Each mark line starts its block's lines."""
    found, name, lines = [], "docstring", []
    for line in text.splitlines():
        mark = MARK.match(line)
        if mark:
            found.append((name, lines))
            name, lines = mark.group(1), [line]
        else:
            lines.append(line)
    found.append((name, lines))
    names = [n for n, _ in found]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"blocks appear twice: {sorted(duplicated)}")
    return found


def blocks(path):
    """{block name: its lines, the mark left out}."""
    return {name: lines[1:] if name != "docstring" else lines for name, lines in split(pathlib.Path(path).read_text())}


def synced(source_text, target_text, add=()):
    """target_text with every block it shares with source_text (but the variant blocks) taken from the source, and
    the source's blocks named in `add` that it lacks put in before the next source block it has."""
    source, target = dict(split(source_text)), split(target_text)
    for name in add:
        if name not in dict(target):
            after = list(source)[list(source).index(name) + 1:]
            at = next(i for i, (n, _) in enumerate(target) if n in after)
            target.insert(at, (name, source[name]))
    out = [lines if name in VARIANT_BLOCKS or name not in source else source[name] for name, lines in target]
    return "\n".join(line for lines in out for line in lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="dreamer_ppo.py", help="the script whose shared blocks are copied")
    parser.add_argument("--check", action="store_true", help="only list the scripts that would change")
    parser.add_argument("--add", action="append", default=[], help="a new block of the source to put into every script")
    opts = parser.parse_args()
    source = ROOT / opts.source
    stale = []
    for target in sorted(ROOT.glob("dreamer_ppo*.py")):
        if target == source:
            continue
        before = target.read_text()
        after = synced(source.read_text(), before, opts.add)
        if after != before:
            stale.append(target.name)
            if not opts.check:
                target.write_text(after)
    print(("would change: " if opts.check else "changed: ") + (", ".join(stale) or "nothing"))
    sys.exit(1 if opts.check and stale else 0)


if __name__ == "__main__":
    main()
