"""Same seed, same numbers: the background evaluation, the dream images, the videos and the training-level
evaluation leave every non-timing scalar of a run as it is, also in bf16 and with an evaluation thread that computes
all along."""

import threading
import time

import pytest
import torch

import dreamer_ppo_random
from test_end_to_end import scalars
from test_resume import timed
from test_transformations import variant_args

EPOCHS = dict(day_epochs=3, night_epochs=2, test_repetitions=1, final_episodes=2)


def run(tmp_path, monkeypatch, name, slow_evaluation=False, **changes):
    """A tiny day and night of RndDreamer (its transformation draws random numbers) in-process, in bf16 autocast
    (forced where the CPU would emulate it); its scalars. `slow_evaluation`: the background evaluation goes on computing in autocast for a second after its returns, as a
    long one does while the next epoch trains."""
    module = dreamer_ppo_random
    monkeypatch.setattr(module, "native_bf16", lambda device: True)
    evaluate = module.evaluate

    def slow(wm, agent, args, step, device, episodes=None, **film):
        returns = evaluate(wm, agent, args, step, device, episodes, **film)
        end = time.time() + 1.0
        while threading.current_thread() is not threading.main_thread() and time.time() < end:
            with module.autocast(device, args), torch.no_grad():
                agent.actor(torch.zeros(8, wm.feat_dim))
        return returns

    if slow_evaluation:
        monkeypatch.setattr(module, "evaluate", slow)
    module.main(variant_args("random", **EPOCHS, bf16=True, run_dir=str(tmp_path / name), **changes))
    return {tag: points for tag, points in scalars(tmp_path / name).items() if not timed(tag)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run with none of the diagnostics: no overlap, no images."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        return run(tmp_path_factory.mktemp("same"), monkeypatch, "reference",
                   eval_overlap=False, dream_images_every=0)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("changes", [
    dict(eval_overlap=True, slow_evaluation=True),  # the evaluation in a thread that computes in autocast throughout
    dict(eval_overlap=False, dream_images_every=1),  # a forced transformation for the images every night epoch
    dict(eval_overlap=False, dream_images_every=0, eval_train_levels=False),  # the test episodes alone
    dict(dream_images_every=1, capture_video=True, video_every=1),  # every video every epoch, filmed in the thread
], ids=["overlapped-evaluation", "dream-images", "no-training-levels", "videos"])
def test_a_diagnostic_changes_no_number_of_the_run(reference, tmp_path, monkeypatch, changes):
    other = run(tmp_path, monkeypatch, "other", **changes)
    if not changes.get("eval_train_levels", True):
        reference = {t: p for t, p in reference.items() if "train_levels" not in t}
    assert set(other) == set(reference)
    for tag, points in reference.items():
        assert other[tag] == points, tag
    assert "charts/test_return" in other and "final/test_return" in other and "losses/loss" in other
