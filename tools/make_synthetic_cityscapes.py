"""Generate a synthetic Cityscapes (official layout, polygons + label images + photos + a short video).

    python tools/make_synthetic_cityscapes.py --root datasets/synthetic_cityscapes \
        --train 40 --val 10 --test 5 --height 256 --width 512 --seed 0

Exit codes (the README's table, seg/errors.py): 0 done; 2 bad arguments (a size or image count out of range) or an
output that cannot be written (one line ``error: <message>`` on stderr naming the value or file).
"""

from __future__ import annotations

import argparse
import sys
import time

from seg.data.synthetic import VIDEO_NAME, generate
from seg.errors import EXIT_USER_ERROR, UserError, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="datasets/synthetic_cityscapes", help="output folder")
    parser.add_argument("--train", type=int, default=40, help="number of train images")
    parser.add_argument("--val", type=int, default=10, help="number of val images")
    parser.add_argument("--test", type=int, default=5, help="number of test images (no labels)")
    parser.add_argument("--height", type=int, default=256, help="image height (32..1024)")
    parser.add_argument("--width", type=int, default=512, help="image width (64..2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video-frames", type=int, default=20, help="frames of the demo video (0: none)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        root = generate(
            args.root, args.train, args.val, args.test, args.height, args.width, args.seed, args.video_frames
        )
    except (UserError, OSError) as e:  # OSError: e.g. --root is a file or a read-only folder
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"wrote {args.train}/{args.val}/{args.test} train/val/test images "
        f"of {args.height}x{args.width} to {root}"
        + (f" and {root / VIDEO_NAME}" if args.video_frames else "")
        + f" in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
