"""A corrupt checkpoint is refused with a message naming the file and how to continue."""

import json

import pytest

from diffusers_timetuner.calibration.checkpoint import CheckpointStore


@pytest.mark.parametrize(
    "content",
    ['{"fingerprint": {"a": 1}, "state": {"ta', "\xff\xfe not json", "[1, 2]"],  # truncated, binary junk, an array
)
def test_corrupt_checkpoint_names_the_file_and_the_way_out(tmp_path, content):
    store = CheckpointStore(str(tmp_path), {"a": 1})
    path = tmp_path / "steps_5.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=r"The checkpoint .*steps_5\.json is (corrupt|not a calibration checkpoint)"
                                         r".*Delete that file.*without --resume_from_checkpoint"):
        store.load(5)


def test_intact_checkpoint_still_loads(tmp_path):
    store = CheckpointStore(str(tmp_path), {"a": 1})
    store.save(5, {"taus": [1.0]})
    assert store.load(5) == {"taus": [1.0]}
    assert json.loads((tmp_path / "steps_5.json").read_text())["fingerprint"] == {"a": 1}
