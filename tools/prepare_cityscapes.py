"""Write Cityscapes *_gtFine_labelTrainIds.png from the polygon JSONs (cityscapesscripts' json2labelImg).

    python tools/prepare_cityscapes.py --root datasets/cityscapes --nproc 8

Files already present are skipped (``--overwrite`` redoes them).
"""

from __future__ import annotations

import argparse
import os
import time

from seg.data.cityscapes import prepare_train_ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="Cityscapes root holding gtFine/ and leftImg8bit/")
    parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args()
    start = time.time()
    written, skipped = prepare_train_ids(args.root, nproc=args.nproc, overwrite=args.overwrite)
    print(
        f"wrote {written} labelTrainIds files, skipped {skipped} already present ({time.time() - start:.1f}s)"
    )


if __name__ == "__main__":
    main()
