"""The bundled class-conditional MNIST UNet (weights in this folder; see PROVENANCE.md and train.py)."""
