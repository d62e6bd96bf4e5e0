"""The bundled class-conditional Fashion-MNIST UNet, its reference images and linear classifier (see PROVENANCE.md)."""
