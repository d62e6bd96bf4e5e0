"""--data_dir x.pt loads tensors only: a pickle carrying code is refused, not run."""

import pytest
import torch

from diffusers_timetuner.cli.calibrate import load_data


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickled_code_in_a_pt_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "data.pt"
    torch.save({"images": torch.zeros(2, 1, 4, 4), "payload": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"--data_dir .*data\.pt holds more than tensors"):
        load_data(str(path))
    assert not marker.exists()


def test_tensor_files_still_load(tmp_path):
    images, labels = torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3])
    torch.save({"images": images, "labels": labels}, tmp_path / "d.pt")
    got_images, got_labels = load_data(str(tmp_path / "d.pt"))
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    torch.save(images, tmp_path / "t.pt")
    assert torch.equal(load_data(str(tmp_path / "t.pt")), images)
