"""The bundled class-conditional flow-matching MNIST UNet (weights in this folder; see PROVENANCE.md and train.py)."""
