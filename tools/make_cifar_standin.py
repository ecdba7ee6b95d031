"""Generate a CIFAR-10-format stand-in (official python-version layout) for tests and CPU smoke runs.

    python tools/make_cifar_standin.py --root datasets/cifar_standin \
        --train-per-class 50 --test-per-class 20 --seed 0

writes ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; read it with
``CifarDataset(root, "cifar10", train)``. Ten procedurally drawn classes (shapes, stripes, checkerboard,
dots) with random colours, positions and noise; the same seed gives the same files.

Exit codes (the README's table, seg/errors.py): 0 done; 2 a count or seed out of range, or an output that cannot
be written (one line ``error: <message>`` on stderr naming the value or file).
"""

from __future__ import annotations

import argparse
import sys
import time

from seg.data.cifar_standin import FOLDER, MAX_TEST_PER_CLASS, MAX_TRAIN_PER_CLASS, generate_cifar10_standin
from seg.errors import EXIT_USER_ERROR, UserError, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help=f"output folder (gets a {FOLDER}/ folder)")
    parser.add_argument(
        "--train-per-class", type=int, default=50, help=f"training images per class (1..{MAX_TRAIN_PER_CLASS})"
    )
    parser.add_argument(
        "--test-per-class", type=int, default=20, help=f"test images per class (1..{MAX_TEST_PER_CLASS})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        root = generate_cifar10_standin(args.root, args.train_per_class, args.test_per_class, args.seed)
    except (UserError, OSError) as e:  # OSError: e.g. --root is a file or a read-only folder
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"wrote {10 * args.train_per_class} train and {10 * args.test_per_class} test images "
        f"to {root / FOLDER} in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
