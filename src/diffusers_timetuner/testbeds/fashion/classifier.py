"""A linear (multinomial logistic-regression) Fashion-MNIST classifier on 16x16 pixels, for the class-accuracy check.

It only answers "is a class-conditional sample of the right kind of clothing?"; sample quality is judged by
Inception FID (`diffusers_timetuner.inception`). Fitted by `main` with scikit-learn on the 60000 training images
(area-downsampled to 16x16, pixels in [-1, 1]); the weights (10 x 256 + 10) are bundled as
``classifier/linear.safetensors`` with their provenance and test accuracy in ``classifier/PROVENANCE.md``.

Rebuild (needs Debian's dataset-fashion-mnist):
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.fashion.classifier
"""
import argparse
import functools
import os
import platform
import time

import torch
from safetensors.torch import load_file, save_file

CLASSIFIER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier")
WEIGHTS_FILE = "linear.safetensors"
SAMPLE_SIZE = 16


@functools.lru_cache(maxsize=1)
def _weights():
    w = load_file(os.path.join(CLASSIFIER_DIR, WEIGHTS_FILE))
    return w["weight"], w["bias"]


def classify(images: torch.Tensor) -> torch.Tensor:
    """Predicted class (int64, (N,)) of (N, 1, 16, 16) images in [-1, 1] (samples are clamped to [-1, 1] first)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, SAMPLE_SIZE, SAMPLE_SIZE):
        raise ValueError(f"classify needs images of shape (N, 1, {SAMPLE_SIZE}, {SAMPLE_SIZE}), "
                         f"got {tuple(images.shape)}.")
    weight, bias = _weights()
    x = images.detach().float().cpu().clamp(-1.0, 1.0).reshape(images.shape[0], -1)
    return (x @ weight.T + bias).argmax(dim=1)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` that `classify` assigns to their label."""
    return float((classify(images) == torch.as_tensor(labels).cpu()).double().mean())


def main(argv=None):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    from ..data import downsample, load_fashion_mnist

    p = argparse.ArgumentParser(description="Fit the bundled linear Fashion-MNIST classifier (16x16 pixels).")
    p.add_argument("--output_dir", default=CLASSIFIER_DIR)
    p.add_argument("--max_iter", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    x_tr = downsample(x_tr, SAMPLE_SIZE).reshape(len(y_tr), -1).numpy()
    x_te = downsample(x_te, SAMPLE_SIZE).reshape(len(y_te), -1).numpy()
    t0 = time.time()
    clf = LogisticRegression(C=1.0, max_iter=args.max_iter, random_state=0).fit(x_tr, y_tr.numpy())
    wall = time.time() - t0
    train_acc, test_acc = clf.score(x_tr, y_tr.numpy()), clf.score(x_te, y_te.numpy())
    os.makedirs(args.output_dir, exist_ok=True)
    save_file({"weight": torch.from_numpy(clf.coef_).float().contiguous(),
               "bias": torch.from_numpy(clf.intercept_).float().contiguous()},
              os.path.join(args.output_dir, WEIGHTS_FILE))
    with open(os.path.join(args.output_dir, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Linear Fashion-MNIST classifier: provenance\n\n"
            "- command: `python -m diffusers_timetuner.testbeds.fashion.classifier`\n"
            f"- model: scikit-learn {sklearn.__version__} LogisticRegression(C=1.0, lbfgs, max_iter={args.max_iter}, "
            "random_state=0) on the 256 pixels of 16x16 area-downsampled images in [-1, 1]\n"
            "- data: the 60000 Fashion-MNIST training images (Debian dataset-fashion-mnist, MIT)\n"
            f"- accuracy: train {100 * train_acc:.2f}%, test (10000 images) {100 * test_acc:.2f}%\n"
            f"- fit time {wall:.0f} s on CPU {platform.machine()}, 1 thread\n"
        )
    print(f"train {train_acc:.4f} test {test_acc:.4f} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
