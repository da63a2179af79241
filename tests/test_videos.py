"""--capture-video: the agent's test episodes, the dreams before and after their transformation and the open-loop
prediction as mp4 files under {run_dir}/videos/ and as GIFs in TensorBoard; a tracked run mirrored to W&B (offline)
with its tags, hyperparameters and videos, and resumed in the same W&B run."""

import pathlib
import signal
import struct

import imageio.v3 as iio
import numpy as np
import pytest

import dreamer_ppo
import dreamer_ppo_random
from conftest import SIZE_FLAGS, tiny_args
from test_end_to_end import read_events, scalars
from test_resume import run_until
from test_transformations import variant_args

FILMED = dict(day_epochs=2, night_epochs=2, dream_images_every=1, capture_video=True, video_every=1)


def videos(run_dir):
    """{tag: {step: (mp4 frames, GIF frames)}}, each (T, height, width, 3), of every video the run logged."""
    acc = read_events(run_dir)
    out = {}
    for tag in acc.Tags()["images"]:
        for event in acc.Images(tag):
            path = pathlib.Path(run_dir, "videos", f"{tag.replace('/', '_')}_{event.step}.mp4")
            if path.exists():
                gif = iio.imread(event.encoded_image_string, extension=".gif", index=None)[..., :3]
                out.setdefault(tag, {})[event.step] = iio.imread(path, plugin="pyav"), gif
    return out


@pytest.fixture(scope="module")
def filmed(tmp_path_factory):
    """A tiny day and night of the Dreamer baseline and of RndDreamer, every video every epoch: their run dirs."""
    root = tmp_path_factory.mktemp("videos")
    dreamer_ppo.main(tiny_args(**FILMED, run_dir=str(root / "baseline")))
    dreamer_ppo_random.main(variant_args("random", **FILMED, run_dir=str(root / "random")))
    return dict(baseline=root / "baseline", random=root / "random")


def test_the_videos_have_their_frames_and_sizes_at_the_steps_of_their_images(filmed):
    for run_dir in filmed.values():
        got, curves, images = videos(run_dir), scalars(run_dir), read_events(run_dir).Tags()["images"]
        assert len(list((run_dir / "videos").glob("*.mp4"))) == sum(len(v) for v in got.values())
        evaluated = [s for s, _ in curves["charts/test_return"]]
        assert sorted([*got["videos/day_agent"], *got["videos/night_agent"]]) == evaluated  # --video-every 1
        assert "dream/before_after" in images and "openloop/truth_prediction_error" in images
        for tag, size in {"dream/video_before_after": (5, 4 * 64, 2 * 64), "openloop/video_truth_prediction_error":
                          (5, 2 * 64, 3 * 64)}.items():  # T = --horizon 5; 4 dreams, 2 windows
            image = tag.replace("video_", "")
            assert set(got[tag]) == {e.step for e in read_events(run_dir).Images(image)}, tag
            # (Pillow merges a GIF's repeated frames into one longer frame: the mp4 counts them)
            assert all(mp4.shape == (*size, 3) and gif.shape[1:] == mp4.shape[1:] for mp4, gif in got[tag].values())
        for mp4, gif in [*got["videos/day_agent"].values(), *got["videos/night_agent"].values()]:
            # 4 episodes side by side, each shown until it ends, then black; the video lasts as the longest
            assert mp4.shape[1:] == gif.shape[1:] == (64, 4 * 64, 3)
            playing = mp4.reshape(len(mp4), 64, 4, 64, 3).mean((1, 3, 4)) > 16  # (T, episode); black is about 0
            lengths = playing.sum(0)
            assert (playing == (np.arange(len(mp4))[:, None] < lengths)).all()
            assert lengths.max() == len(mp4) and lengths.min() >= 1


def test_the_dream_video_shows_the_transformation(filmed):
    for name, run_dir in filmed.items():
        for mp4, gif in videos(run_dir)["dream/video_before_after"].values():
            before, after = gif[:, :, :64].astype(int), gif[:, :, 64:].astype(int)
            if name == "baseline":  # the Dreamer baseline transforms nothing
                assert (before == after).all()
            else:  # RndDreamer's swing changes every forced state's picture
                assert (np.abs(before - after).mean((1, 2, 3)) > 1).all()
        for mp4, gif in videos(run_dir)["openloop/video_truth_prediction_error"].values():
            truth, prediction, error = (gif[:, :, 64 * k: 64 * (k + 1)].astype(int) for k in range(3))
            difference = np.abs(prediction - truth)  # the third column, up to the GIF's palette and dithering
            assert np.abs(error - difference).mean() < difference.mean() / 4


def wandb_records(path):
    """The protobuf records of an offline W&B run's .wandb file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: crc, length, type) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, records, chunks, pos = pathlib.Path(path).read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes are padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        chunks, pos = chunks + data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or a record's last chunk
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_a_tracked_run_is_mirrored_to_wandb_and_resumed_in_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    flags = [*SIZE_FLAGS, "--day-epochs", "2", "--night-epochs", "1", "--track", "--capture-video", "--video-every",
             "1", "--run-dir", "run"]
    code, out, err = run_until(flags, tmp_path, "[day 1/", send=signal.SIGTERM)
    assert code == 75, err[-2000:]
    code, out, err = run_until([*flags, "--resume"], tmp_path)
    assert code == 0 and "resumed from the checkpoint of day epoch" in out, err[-2000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name == f"run-{(tmp_path / 'run' / 'wandb_id').read_text()}.wandb"
    records = [r for path in runs for r in wandb_records(path)]
    config = {i.key: i.value_json for r in records if r.HasField("run") for i in r.run.config.update}
    assert config["horizon"] == "5" and config["seed"] == "1" and config["capture_video"] == "true"
    assert config["precision"] == '"fp32"' and config["run_dir"] == '"run"'
    logged = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    assert set(scalars(tmp_path / "run")) <= logged  # every TensorBoard scalar
    for tag in ("videos/day_agent", "videos/night_agent", "dream/video_before_after",
                "openloop/video_truth_prediction_error"):
        assert f"{tag}/format" in logged, tag
    gifs = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/*.gif"))
    assert len(gifs) >= 4 and all(iio.imread(g, index=None).shape[0] > 1 for g in gifs)
