"""`flame-kd data`: make, check and split frame data sets (the CLI's data commands, apart by job; cli.py
adds the group to the command line)."""

from __future__ import annotations

import click

from flame_kd.config import DataConfig
from flame_kd.options import OrNone
from flame_kd.validation import MAX_SEED

SYNTH_MAX_FRAMES = 100_000  # about twice FLAME2's 53,451 pairs; ~2 MB of PNGs per 10 frames at 254 px
SYNTH_MAX_IMAGE_SIZE = 1024  # FLAME2's frames are 254 px; models train at 224


# --- data commands (synth, prepare, check, split) ------------------------------------------------


@click.group()
def data() -> None:
    """Make, check and split frame data sets (FLAME2 or synthetic)."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--frames", type=int, default=None,
              help=f"frame pairs to draw, 3 to {SYNTH_MAX_FRAMES}  [default: 600; layout flame2: 53,451]")
@click.option("--image-size", default=254, show_default=True,
              help=f"frame width and height in pixels, 8 to {SYNTH_MAX_IMAGE_SIZE}")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True,
              help="same seed, byte-identical files")
@click.option("--difficulty", type=click.Choice(["realistic", "classic", "easy"]), default="realistic", show_default=True,
              help="realistic: labels in layout and IR, not global colour (issue #31, gates in docs/benchmarks.md); "
                   "classic: the set before it (global colour gives most labels away); easy: any model scores 1.0 (fast tests)")
@click.option("--layout", type=click.Choice(["segments", "flame2"]), default="segments", show_default=True,
              help="segments: --frames cut into short NN/YY/YN scenes; flame2: FLAME2's 53,451 frames in its 19 label ranges")
def data_synth(out: str, frames: int | None, image_size: int, seed: int, difficulty: str, layout: str) -> None:
    """Write a FLAME2-like data set to OUT (image folders, flame2.csv, label_ranges.tsv)."""
    from flame_kd.data import synth

    if layout == "flame2" and frames not in (None, synth.FLAME2_FRAMES):
        raise click.BadParameter(f"--layout flame2 draws FLAME2's {synth.FLAME2_FRAMES:,} frames; leave --frames out")
    if layout == "segments" and frames is None:
        frames = 600
    if (frames is not None and frames < 3) or image_size < 8:
        raise click.BadParameter("need --frames >= 3 and --image-size >= 8")
    if (frames or 0) > SYNTH_MAX_FRAMES or image_size > SYNTH_MAX_IMAGE_SIZE:
        raise click.BadParameter(f"need --frames <= {SYNTH_MAX_FRAMES} and --image-size <= {SYNTH_MAX_IMAGE_SIZE}, "
                                 f"got {frames} and {image_size}")
    click.echo(synth.describe(synth.synthesize(out, frames=frames, image_size=image_size, seed=seed,
                                                    difficulty=difficulty, layout=layout)))


@data.command("prepare")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="FLAME2 label-range file; default: the official ranges shipped with flame-kd")
@click.option("--rgb-dir", required=True, type=click.Path(file_okay=False), help="folder of 254p RGB frames")
@click.option("--ir-dir", required=True, type=click.Path(file_okay=False), help="folder of 254p thermal frames")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="frames CSV to write")
def data_prepare(labels: str | None, rgb_dir: str, ir_dir: str, out: str) -> None:
    """Build the frames CSV from FLAME2's label ranges and its two image folders."""
    from flame_kd.data.labels import prepare

    click.echo(prepare(labels, rgb_dir, ir_dir, out).summary())


@data.command("check")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--root", type=OrNone(click.Path(file_okay=False)), default=None,
              help="data root frame paths resolve against; default: the CSV's folder")
def data_check(csv: str, root: str | None) -> None:
    """Check a frames CSV against the data contract: every problem listed, exit 2 if any."""
    from flame_kd.data.schema import check_frames, format_problems
    from flame_kd.errors import DataError

    report = check_frames(csv, root)
    click.echo(report.summary)
    if report.problems:
        n = len(report.problems)
        raise DataError(f"{n} problem(s) in {csv}:\n{format_problems(report.problems)}", report.problems)
    click.echo("OK")


@data.command("split")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True, help="split seed")
@click.option("--ratios", default="0.7,0.15,0.15", show_default=True,
              help="train,val,test frame fractions, each > 0, summing to 1")
@click.option("--labels", type=OrNone(click.Path(dir_okay=False)), default=None,
              help="label-range file for the groups; default: label_ranges.tsv next to the CSV, if any")
@click.option("--out", type=OrNone(click.Path(dir_okay=False)), default=None, help="write the manifest CSV here")
@click.option("--gap", default=DataConfig().gap, show_default=True,
              help=DataConfig.__dataclass_fields__["gap"].metadata["help"])
def data_split(csv: str, seed: int, ratios: str, labels: str | None, out: str | None, gap: str) -> None:
    """Split a frames CSV by video / label range into train, val and test; with images, measure the
    gap and the test frames' similarity to train (else names suffice)."""
    from flame_kd.data.labels import find_label_ranges
    from flame_kd.data.schema import load_frames
    from flame_kd.data.split import parse_gap, parse_ratios, part_problems, split_frames
    from flame_kd.errors import ConfigError, DataError
    from flame_kd.data.thumbs import frame_thumbnails, images_available
    from flame_kd.validation import ratios_problem

    parse_gap(gap)
    problem = ratios_problem(parse_ratios(ratios))
    if problem:
        raise ConfigError(f"--ratios {problem}")
    frames = load_frames(csv, check_files=False, ranges=labels)
    thumbs = frame_thumbnails(frames) if images_available(frames) else None
    split = split_frames(frames, seed=seed, ratios=parse_ratios(ratios), ranges=labels or find_label_ranges(csv),
                         gap=gap, thumbs=thumbs)
    click.echo(split.summary())
    problems = part_problems(split)
    if problems:
        raise DataError(f"{csv}: {'; '.join(problems)}: nothing written", problems)
    if out:
        try:
            split.manifest.to_csv(out, index=False)
        except OSError as err:
            raise DataError(f"cannot write the manifest to --out {out}: {err.strerror or err}") from None
        click.echo(f"wrote the manifest to {out}")
