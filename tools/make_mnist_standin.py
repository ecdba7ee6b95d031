"""Generate an MNIST- or Fashion-MNIST-format stand-in (the four official idx files) for tests and CPU runs.

    python tools/make_mnist_standin.py --root datasets/mnist_standin --kind mnist \
        --train-per-class 50 --test-per-class 20 --seed 0

writes ``<root>/{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte}`` (``--gzip``: the ``.gz`` files); read it with ``MnistDataset(root, kind, train)`` or
train on it with ``configs/mnist/standin_mlp_deconv.yaml``. ``--kind mnist`` typesets the ten digits,
``--kind fashion_mnist`` draws crude silhouettes of the ten Fashion-MNIST classes; random affine maps,
brightness and noise; the same seed gives the same files.

Exit codes (the README's table, seg/errors.py): 0 done; 2 a count, kind or seed out of range, or an output that
cannot be written (one line ``error: <message>`` on stderr naming the value or file).
"""

from __future__ import annotations

import argparse
import sys
import time

from seg.data.mnist_standin import KINDS, MAX_TEST_PER_CLASS, MAX_TRAIN_PER_CLASS, generate_mnist_standin
from seg.errors import EXIT_USER_ERROR, UserError, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="output folder (gets the four idx files)")
    parser.add_argument("--kind", default="mnist", help=f"which dataset's stand-in: {' or '.join(KINDS)}")
    parser.add_argument(
        "--train-per-class", type=int, default=50, help=f"training images per class (1..{MAX_TRAIN_PER_CLASS})"
    )
    parser.add_argument(
        "--test-per-class", type=int, default=20, help=f"test images per class (1..{MAX_TEST_PER_CLASS})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--gzip", action="store_true", help="write the gzipped files (*.gz), as distributed")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        root = generate_mnist_standin(args.root, args.train_per_class, args.test_per_class, args.seed, args.kind,
                                      gzip=args.gzip)
    except (UserError, OSError) as e:  # OSError: e.g. --root is a file or a read-only folder
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {10 * args.train_per_class} train and {10 * args.test_per_class} test {args.kind} images "
          f"to {root} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
