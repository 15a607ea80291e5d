"""Bytes per frame of the cached teacher outputs, per registered teacher and stored output.

    python bench/teacher_cache_size.py [--image-size 224] [--views 8] [--fusion late]

Builds each teacher on the meta device (no weights, no memory) and runs one meta forward with its stage
maps, so the shapes are the real ones at that image size; prints float16 bytes per frame of each output
(logits, features, attention, hint) and of a cache per frame: a training frame is stored plain and in
K views, a val/test frame plain.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    from flame_kd.losses import OUTPUTS, model_outputs
    from flame_kd.models import TEACHERS, build_teacher
    from flame_kd.teacher_cache import STORE, flatten_outputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--fusion", default="late")
    p.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    p.add_argument("--frames", type=int, default=53_451, help="frames of the data set (FLAME2: 53,451)")
    p.add_argument("--train-fraction", type=float, default=0.7)
    args = p.parse_args(argv)
    size, item = args.image_size, torch.empty((), dtype=STORE).element_size()
    names = list(OUTPUTS)
    n_train = round(args.frames * args.train_fraction)
    n_rest = args.frames - n_train
    print(f"float16 bytes per frame of each cached teacher output at {size} px ({args.fusion} fusion), and the "
          f"cache of a variant for {args.frames:,} frames ({n_train:,} training frames in {args.views} views each)")
    print(f"{'teacher':<16}" + "".join(f"{n:>11}" for n in names) + f"{'kl_bce':>10}{'kl_at_bce':>11}{'kl_hint_bce':>13}")
    for name in args.teachers:
        with torch.device("meta"):
            teacher = build_teacher(name, fusion=args.fusion, image_size=size).eval()
            x = torch.empty(1, 3, size, size)
            out = flatten_outputs(model_outputs(teacher(x, x, maps=True), names))
        per = {n: sum(t.numel() for k, t in out.items() if k.partition(".")[0] == n) * item for n in names}
        base = per["logits"] + per["features"]

        def total(frame_bytes: int) -> str:
            return f"{(n_train * (1 + args.views) + n_rest) * frame_bytes / 2**30:.1f} GiB"

        print(f"{name:<16}" + "".join(f"{per[n]:>9,} B" for n in names)
              + f"{total(base):>10}{total(base + per['attention']):>11}{total(base + per['hint']):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
