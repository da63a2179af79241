"""The project's own account of its choices (CHOICES.md): every script points to it, and every flag it names
is a flag of some script (a renamed flag cannot leave the account behind)."""
import dataclasses
import importlib
import re

from tools.sync_blocks import ROOT

SCRIPTS = sorted(ROOT.glob("dreamer_ppo*.py"))


def test_every_script_points_to_the_choices():
    assert (ROOT / "CHOICES.md").is_file()
    for script in SCRIPTS:
        assert "CHOICES.md" in importlib.import_module(script.stem).__doc__, script.name


def test_every_flag_the_choices_name_exists():
    flags = {"--" + f.name.replace("_", "-") for script in SCRIPTS
             for f in dataclasses.fields(importlib.import_module(script.stem).Args)}
    flags |= {"--no-" + flag[2:] for flag in flags}  # tyro's negation of a boolean flag
    named = set(re.findall(r"`(--[a-z0-9-]+)", (ROOT / "CHOICES.md").read_text()))
    assert len(named) > 10 and named <= flags, named - flags
