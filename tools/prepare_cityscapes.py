"""Write Cityscapes *_gtFine_labelTrainIds.png from the polygon JSONs (cityscapesscripts' json2labelImg).

    python tools/prepare_cityscapes.py --root datasets/cityscapes --nproc 8

Files already present are skipped (``--overwrite`` redoes them).

Exit codes (the README's table, seg/errors.py): 0 done; 2 bad arguments, no ``gtFine/`` folder or polygon JSONs
under the root, or a JSON that cannot be converted (one line ``error: <message>`` on stderr naming the folder or
file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from seg.data.cityscapes import prepare_train_ids
from seg.errors import EXIT_USER_ERROR, UserError, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="Cityscapes root holding gtFine/ and leftImg8bit/")
    parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        print(f"error: --nproc {args.nproc}: expected at least 1", file=sys.stderr)
        return EXIT_USER_ERROR
    start = time.time()
    try:
        written, skipped = prepare_train_ids(args.root, nproc=args.nproc, overwrite=args.overwrite)
    except (UserError, OSError) as e:  # OSError: a label file that cannot be written
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"wrote {written} labelTrainIds files, skipped {skipped} already present ({time.time() - start:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
