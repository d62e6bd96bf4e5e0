"""The CLI's inputs: --data_dir (.pt / .npy / .npz / a folder of images), --labels, --prompts_file and
--resume_from_checkpoint reach calibrate() as given, and a bad one is refused in one line before the model loads."""

import json
import re

import numpy as np
import pytest
import torch

from diffusers_timetuner.cli import calibrate as cli

TINY = ["--num_inference_steps", "2", "--num_samples", "4", "--batch_size", "4", "--num_validation_samples", "2",
        "--num_heldout_samples", "2", "--no_progress", "--cpu"]
GMM = ["--pretrained_model_name_or_path", "gmm", *TINY]


@pytest.fixture
def seen(monkeypatch):
    """What main() passes to calibrate() (the real one still runs)."""
    from diffusers_timetuner import calibration

    calls = {}
    real = calibration.calibrate

    def spy(*args, **kwargs):
        calls.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    return calls


def _gmm_images(n=6):
    """Images of the bundled mixture's shape (1, 8, 8), in its input range."""
    from diffusers_timetuner.testbeds import load_gmm_model

    return load_gmm_model().sample_data(n, generator=torch.Generator().manual_seed(3)).float()


def _write(kind, folder):
    """Data of one kind under `folder`; returns (--data_dir value, the images calibrate() must receive)."""
    images = _gmm_images()
    if kind == "pt":
        torch.save(images, folder / "d.pt")
        return folder / "d.pt", images
    if kind == "pt-dict":
        torch.save({"images": images}, folder / "d.pt")
        return folder / "d.pt", images
    if kind == "npy":
        np.save(folder / "d.npy", images.numpy())
        return folder / "d.npy", images
    if kind == "npz":
        np.savez(folder / "d.npz", images=images.numpy())
        return folder / "d.npz", images
    from PIL import Image  # a folder of 8-bit grayscale PNGs: the CLI maps 0..255 to [-1, 1]

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    (folder / "imgs").mkdir()
    for k, p in enumerate(pixels):
        Image.fromarray(p).save(folder / "imgs" / f"{k}.png")
    return folder / "imgs", torch.from_numpy(pixels[:, None].astype(np.float32) / 127.5 - 1.0)


@pytest.mark.parametrize("kind", ["pt", "pt-dict", "npy", "npz", "folder"])
def test_data_dir_reaches_calibrate_and_the_data_strategy_runs(tmp_path, seen, kind):
    path, expected = _write(kind, tmp_path)
    res = cli.main(cli.parse_args([*GMM, "--data_dir", str(path), "--objective", "paper", "--strategy", "sequential",
                                   "--output_dir", str(tmp_path / "out")]))
    torch.testing.assert_close(seen["data"], expected, rtol=0, atol=1e-6)
    assert res.settings["strategy"] == "sequential" and res.settings["data_free"] is False
    assert (tmp_path / "out" / "scheduler_config.json").exists()


def test_npz_and_pt_labels_come_with_their_images(tmp_path):
    images, labels = _gmm_images(4), torch.tensor([1, 0, 3, 2])
    np.savez(tmp_path / "d.npz", images=images.numpy(), labels=labels.numpy())
    torch.save({"images": images, "labels": labels}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        got_images, got_labels = cli.load_data(str(tmp_path / name))
        assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def test_labels_condition_every_network_call(tmp_path, monkeypatch):
    """--labels 3 7 on the bundled class-conditional MNIST UNet: the record names them and the network gets only them
    (no guidance, so no null class)."""
    labels_seen = set()
    load = cli.load_model

    def load_and_watch(path):
        pipeline, model_id = load(path)
        pipeline.unet.register_forward_pre_hook(
            lambda module, args, kwargs: labels_seen.update(kwargs["class_labels"].tolist()), with_kwargs=True)
        return pipeline, model_id

    monkeypatch.setattr(cli, "load_model", load_and_watch)
    res = cli.main(cli.parse_args(["--pretrained_model_name_or_path", "mnist", *TINY, "--teacher_steps", "4",
                                   "--labels", "3", "7", "--output_dir", str(tmp_path / "out")]))
    conditioning = res.scheduler.config.tuning_info["2"]["conditioning"]
    assert conditioning["kind"] == "class_labels" and set(conditioning["labels"]) == {3, 7}
    assert labels_seen == {3, 7}


@pytest.fixture(scope="module")
def text_pipeline_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved as a folder (random weights, no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=1000, max_position_embeddings=16))
    folder = tmp_path_factory.mktemp("tiny_sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "dog</w>": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                        model_max_length=16)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return str(folder / "pipe")


def test_prompts_file_conditions_the_text_pipeline(tmp_path, text_pipeline_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")  # blank lines and surrounding spaces are dropped
    res = cli.main(cli.parse_args(["--pretrained_model_name_or_path", text_pipeline_dir, *TINY, "--teacher_steps", "4",
                                   "--prompts_file", str(prompts), "--guidance_scale", "3", "--negative_prompt", "a",
                                   "--output_dir", str(tmp_path / "out")]))
    info = res.scheduler.config.tuning_info["2"]
    assert info["conditioning"]["prompts"] == ["a cat", "a dog"] and info["guidance_scale"] == 3.0


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: ["--data_dir", str(d / "missing.npy")], r"--data_dir .*missing\.npy does not exist"),
        (lambda d: ["--data_dir", str(_touch(d / "notes.txt"))], r"--data_dir .*notes\.txt is not a \.pt/\.npy/\.npz"),
        (lambda d: ["--prompts_file", str(d / "missing.txt")], r"--prompts_file .*missing\.txt is not a file"),
        (lambda d: ["--labels", "1", "--prompts_file", str(_touch(d / "p.txt"))], r"Give --labels or --prompts_file"),
        (lambda d: ["--resume_from_checkpoint", str(d / "nowhere")], r"--resume_from_checkpoint .*nowhere is not a"),
    ],
)
def test_bad_input_paths_are_one_line_exit_2_at_parse_time(tmp_path, capsys, make, match):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*GMM, "--output_dir", str(tmp_path / "out"), *make(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err


def _touch(path, text="a cat\n"):
    path.write_text(text)
    return path


def _bad_files(d):
    np.save(d / "flat.npy", np.zeros((4, 8, 8), np.float32))  # no channel axis
    np.save(d / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.savez(d / "nokey.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    torch.save({"x": torch.zeros(4, 1, 8, 8)}, d / "nokey.pt")
    torch.save([1, 2], d / "list.pt")
    torch.save({"images": torch.zeros(4, 1, 8, 8), "labels": torch.tensor([1, 2])}, d / "fewlabels.pt")
    (d / "mixed").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(d / "mixed" / "b.png")
    (d / "noimages").mkdir()
    (d / "blank.txt").write_text("\n  \n")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--data_dir", "flat.npy"], r"holds images of shape \(4, 8, 8\); expected \(N, C, H, W\)"),
        (["--data_dir", "empty.npy"], r"empty\.npy holds no images"),
        (["--data_dir", "objects.npy"], r"objects\.npy is not a readable NumPy \.npy file of numbers"),
        (["--data_dir", "nokey.npz"], r"nokey\.npz has no 'images' entry \(it holds \['x'\]\)"),
        (["--data_dir", "nokey.pt"], r"nokey\.pt has no 'images' entry"),
        (["--data_dir", "list.pt"], r"list\.pt holds a list, not a tensor"),
        (["--data_dir", "fewlabels.pt"], r"has 4 images but labels of shape \(2,\)"),
        (["--data_dir", "mixed"], r"mixed holds images of different sizes"),
        (["--data_dir", "noimages"], r"noimages holds no images"),
        (["--prompts_file", "blank.txt"], r"blank\.txt holds no prompt"),
    ],
)
def test_bad_file_contents_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, match):
    _bad_files(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda path: pytest.fail("the model must not be loaded"))
    argv = [*GMM, "--output_dir", str(tmp_path / "out"), extra[0], str(tmp_path / extra[1])]
    with pytest.raises(ValueError, match=match):
        cli.main(cli.parse_args(argv))
    assert not (tmp_path / "out" / "scheduler_config.json").exists()
    # the console script says it in one line with exit code 2, no traceback
    monkeypatch.setattr("sys.argv", ["timetuner-calibrate", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.cli()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "timetuner-calibrate: error: --" in err and "Traceback" not in err


def test_data_of_another_shape_than_the_model_is_refused_before_any_evaluation(tmp_path, monkeypatch):
    """(N, 1, 4, 16) images for the (1, 8, 8) mixture: the same number of pixels, so its network would have run on
    them; the model's shape is taken from its config, not from the data."""
    from diffusers_timetuner.testbeds import load_gmm_pipeline

    pipeline = load_gmm_pipeline()
    monkeypatch.setattr(type(pipeline.unet), "forward", lambda *a, **k: pytest.fail("evaluated before the check"))
    torch.save(torch.zeros(4, 1, 4, 16), tmp_path / "wide.pt")
    monkeypatch.setattr(cli, "load_model", lambda path: (pipeline, "gmm"))
    with pytest.raises(ValueError, match=r"data has samples of shape \(1, 4, 16\), the model expects \(1, 8, 8\)"):
        cli.main(cli.parse_args([*GMM, "--data_dir", str(tmp_path / "wide.pt"), "--objective", "paper",
                                 "--strategy", "sequential", "--output_dir", str(tmp_path / "out")]))
