"""Data pipeline at real dataset sizes: a synthetic RELION project of many stacks, the STAR
file at 10^6 rows, and particles read in training order (cold and warm page cache).

Sub-commands:

``make DIR``
    writes a RELION 3.1+ project: ``DIR/Extract/job001/Movies/mic_NNNNNN.mrcs`` (one stack per
    micrograph, ``--n-particles`` spread over ``--n-stacks``; float32 MRC mode 2, or float16
    mode 12 with ``--float16``) and ``DIR/particles.star`` (the columns of a RELION 3D
    auto-refine's ``run_data.star``: 23 particle columns). Pixel values: white noise tiled from
    a 1,000-image block, with each image's first pixel set to its particle number (so a read
    can be checked).
``star DIR``
    reads ``particles.star`` with ``starfile.read`` and with this project's
    :func:`relion_external.star_io.read_particles_star`, and writes it back with both; seconds
    and maximum RSS.
``read DIR``
    start-up (STAR parse and particle table, stack header checks) of
    :func:`relion_external.particles_adapter.load_particle_set`, then particles read in
    training order (a random permutation of all particles, ``--batch-size`` at a time, as
    ``make_batch`` does; ``--order chunked`` for stack-local chunks) for ``--seconds`` or
    ``--n-particles``: particles/s and RSS, cold (every stack's pages dropped from the page
    cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` first: no root needed, works for clean
    pages) or warm (``--warm``: the whole dataset read once first). ``--prefetch`` reads through
    :func:`dynamight_core.batch_prefetch.prefetch_batches` (background thread) while the main
    thread sleeps ``--consume-ms`` per batch (a stand-in for the GPU's work).

Examples::

    python benchmarks/bench_data.py make /tmp/wt13_d64 --n-particles 1000000 --box 64 \\
        --n-stacks 10000
    python benchmarks/bench_data.py star /tmp/wt13_d64
    python benchmarks/bench_data.py read /tmp/wt13_d64 --seconds 60
    python benchmarks/bench_data.py read /tmp/wt13_d64 --seconds 60 --warm
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import cpu_name, max_rss_mib

STACK_FOLDER = Path("Extract") / "job001" / "Movies"
OPTICS = ("data_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
          "_rlnMtfFileName #3\n_rlnMicrographOriginalPixelSize #4\n_rlnVoltage #5\n"
          "_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n_rlnImagePixelSize #8\n"
          "_rlnImageSize #9\n_rlnImageDimensionality #10\n"
          "opticsGroup1 1 mtf_k2_200kV.star 0.885000 300.000000 2.700000 0.100000 {px:.6f} "
          "{box:d} 2\n\n\n")
PARTICLE_COLUMNS = (
    "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber",
    "rlnAnglePsi", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup",
    "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnDefocusU", "rlnDefocusV",
    "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift", "rlnAngleRot",
    "rlnAngleTilt", "rlnOriginXAngst", "rlnOriginYAngst", "rlnNormCorrection",
    "rlnLogLikeliContribution", "rlnRandomSubset",
)


def _mrc_header(folder: Path, box: int, n: int, mode: int, pixel_size: float) -> bytes:
    """The 1,024-byte header of a stack of ``n`` images (made once by mrcfile, then copied:
    mrcfile.new for each of 10^4 stacks would take longer than writing the data)."""
    import mrcfile
    path = folder / ".header.mrcs"
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=mode, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size
        header = mrc.header.tobytes()
    path.unlink()
    return header


def make(args) -> None:
    root = Path(args.directory)
    stacks = root / STACK_FOLDER
    stacks.mkdir(parents=True, exist_ok=True)
    n, box, n_stacks = args.n_particles, args.box, args.n_stacks
    dtype, mode = (np.float16, 12) if args.float16 else (np.float32, 2)
    rng = np.random.default_rng(args.seed)
    block = rng.standard_normal((1000, box, box)).astype(dtype)
    # particles per stack: as even as possible (real micrographs vary; the reader does not care)
    counts = np.full(n_stacks, n // n_stacks)
    counts[: n % n_stacks] += 1
    t0 = time.time()
    written = 0
    headers: dict[int, bytes] = {}
    stack_of = np.repeat(np.arange(n_stacks), counts)
    position = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    for s, count in enumerate(counts):
        if count not in headers:
            headers[count] = _mrc_header(stacks, box, int(count), mode, args.pixel_size)
        images = block[(written + np.arange(count)) % len(block)].copy()
        images[:, 0, 0] = written + np.arange(count)  # float16: exact up to 2048 only
        with open(stacks / f"mic_{s:06d}.mrcs", "wb") as f:
            f.write(headers[count])
            f.write(images.tobytes())
        written += count
        if (s + 1) % 1000 == 0:
            print(f"  {s + 1} stacks, {written} particles, {time.time() - t0:.0f} s", flush=True)
    t_stacks = time.time() - t0
    # the STAR file, formatted as RELION writes it
    t0 = time.time()
    names = np.char.add(np.char.add(np.char.zfill((position + 1).astype(str), 6), "@"),
                        np.char.add(f"{STACK_FOLDER}/mic_", np.char.add(
                            np.char.zfill(stack_of.astype(str), 6), ".mrcs")))
    mics = np.char.add("MotionCorr/job002/Movies/mic_",
                       np.char.add(np.char.zfill(stack_of.astype(str), 6), ".mrc"))
    defocus = rng.uniform(8000, 25000, n_stacks)[stack_of]
    half = np.where(rng.permutation(n) < n // 2, 1, 2)
    columns = {
        "rlnCoordinateX": rng.uniform(100, 3700, n), "rlnCoordinateY": rng.uniform(100, 3700, n),
        "rlnAutopickFigureOfMerit": rng.normal(1, 0.3, n), "rlnClassNumber": np.ones(n, int),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnImageName": names,
        "rlnMicrographName": mics, "rlnOpticsGroup": np.ones(n, int),
        "rlnCtfMaxResolution": rng.uniform(3, 6, n), "rlnCtfFigureOfMerit": rng.uniform(0, 1, n),
        "rlnDefocusU": defocus + 150, "rlnDefocusV": defocus - 150,
        "rlnDefocusAngle": rng.uniform(-90, 90, n_stacks)[stack_of],
        "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnPhaseShift": np.zeros(n), "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n), "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 3, n), "rlnNormCorrection": rng.normal(1, 0.05, n),
        "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n), "rlnRandomSubset": half,
    }
    with open(root / "particles.star", "w") as f:
        f.write("\n# version 30001\n\n")
        f.write(OPTICS.format(px=args.pixel_size, box=box))
        f.write("# version 30001\n\ndata_particles\n\nloop_\n")
        f.writelines(f"_{name} #{i}\n" for i, name in enumerate(PARTICLE_COLUMNS, 1))
        text = [columns[c] if columns[c].dtype.kind in "US" else
                columns[c].astype(str) if columns[c].dtype.kind == "i" else
                np.char.mod("%.6f", columns[c]) for c in PARTICLE_COLUMNS]
        for start in range(0, n, 100_000):
            part = [t[start:start + 100_000] for t in text]
            f.write("\n".join(" ".join(row) for row in zip(*part)))
            f.write("\n")
        f.write("\n")
    print(f"made {n} particles of box {box} ({np.dtype(dtype).name}) in {n_stacks} stacks: "
          f"stacks {t_stacks:.0f} s, STAR {time.time() - t0:.0f} s; "
          f"{sum(counts) * box * box * np.dtype(dtype).itemsize / 2**30:.2f} GiB", flush=True)


def drop_page_cache(directory: Path) -> int:
    """``posix_fadvise(DONTNEED)`` on every stack under ``directory``; returns the count."""
    count = 0
    for path in (directory / STACK_FOLDER).iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        count += 1
    return count


def star(args) -> None:
    import starfile

    from relion_external.star_io import read_particles_star, write_particles_star
    path = Path(args.directory) / "particles.star"
    print(f"# {path}: {path.stat().st_size / 2**20:.0f} MiB; {cpu_name()}", flush=True)
    t0 = time.time()
    blocks = starfile.read(path, always_dict=True)
    print(f"starfile.read: {time.time() - t0:.1f} s, {len(blocks['particles'])} rows, "
          f"max RSS {max_rss_mib():.0f} MiB", flush=True)
    t0 = time.time()
    data = read_particles_star(path)
    print(f"star_io.read_particles_star: {time.time() - t0:.1f} s, max RSS {max_rss_mib():.0f} MiB",
          flush=True)
    out = Path(args.directory) / "written.star"
    if not args.skip_starfile_write:
        t0 = time.time()
        starfile.write(blocks, out)
        print(f"starfile.write: {time.time() - t0:.1f} s, max RSS {max_rss_mib():.0f} MiB",
              flush=True)
    t0 = time.time()
    write_particles_star(out, data)
    print(f"star_io.write_particles_star: {time.time() - t0:.1f} s, "
          f"{out.stat().st_size / 2**20:.0f} MiB, max RSS {max_rss_mib():.0f} MiB", flush=True)
    t0 = time.time()
    again = read_particles_star(out)
    print(f"star_io.read_particles_star of the written file: {time.time() - t0:.1f} s", flush=True)
    import pandas as pd
    pd.testing.assert_frame_equal(again.particles, data.particles, check_exact=True)
    print("round trip: identical table", flush=True)
    out.unlink()


def _order(particles, kind: str, rng: np.random.Generator) -> np.ndarray:
    n = len(particles)
    if kind == "random":
        return rng.permutation(n)
    import torch

    from dynamight_core.batch_prefetch import chunked_order
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    return chunked_order(np.arange(n), particles.images.group_ids(), generator)


def read(args) -> None:
    import resource

    import torch

    from relion_external.particles_adapter import load_particle_set
    torch.set_num_threads(1)
    root = Path(args.directory)
    print(f"# {root}: {cpu_name()}, {os.cpu_count()} cores; order {args.order}, batch "
          f"{args.batch_size}, prefetch {args.prefetch}, cache {'warm' if args.warm else 'cold'}",
          flush=True)
    if not args.warm:
        t0 = time.time()
        count = drop_page_cache(root)
        print(f"dropped {count} stacks from the page cache (posix_fadvise DONTNEED, "
              f"{time.time() - t0:.1f} s)", flush=True)
    rss0 = max_rss_mib()
    t0 = time.time()
    particles, _ = load_particle_set(root / "particles.star", project_dir=root,
                                     **({"read_threads": args.read_threads}
                                        if args.read_threads else {}))
    startup = time.time() - t0
    print(f"start-up (STAR parse, particle table, {len(particles)} particles, stack header "
          f"checks): {startup:.1f} s, max RSS {max_rss_mib():.0f} MiB (+{max_rss_mib() - rss0:.0f})",
          flush=True)
    rng = np.random.default_rng(args.seed)
    if args.warm:
        t0 = time.time()
        for start in range(0, len(particles), 1_000):
            particles.images.read(np.arange(start, min(start + 1_000, len(particles))))
        print(f"warm-up: read all {len(particles)} particles in file order, "
              f"{time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    order = _order(particles, args.order, rng)
    t_order = time.time() - t0
    limit = min(args.n_particles or len(order), len(order))
    chunks = [order[s:s + args.batch_size] for s in range(0, limit, args.batch_size)]
    device = torch.device("cpu")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    done = 0
    if args.prefetch:
        from dynamight_core.batch_prefetch import prefetch_batches
        batches = prefetch_batches(particles, chunks, device)
    else:
        from dynamight_core.deformation_model import make_batch
        batches = (make_batch(particles, c, device) for c in chunks)
    for batch in batches:
        done += len(batch.indices)
        if args.check:
            expected = batch.indices.astype(np.float32)
            got = batch.images[:, 0, 0].numpy()
            if not np.array_equal(got, expected if not args.float16 else
                                  expected.astype(np.float16).astype(np.float32)):
                raise SystemExit("wrong images read")
        if args.consume_ms:
            time.sleep(args.consume_ms / 1000)
        if time.time() - t0 > args.seconds:
            break
    elapsed = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
    if hasattr(batches, "close"):
        batches.close()
    print(f"read {done} particles in training order in {elapsed:.1f} s: {done / elapsed:.0f} "
          f"particles/s ({cpu / done * 1e6:.0f} CPU-us/particle, order {t_order:.2f} s); "
          f"max RSS {max_rss_mib():.0f} MiB", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("directory")
    p.add_argument("--n-particles", type=int, default=1_000_000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--n-stacks", type=int, default=10_000)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--float16", action="store_true", help="MRC mode 12 stacks")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("star")
    p.add_argument("directory")
    p.add_argument("--skip-starfile-write", action="store_true")
    p = sub.add_parser("read")
    p.add_argument("directory")
    p.add_argument("--order", choices=["random", "chunked"], default="random")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seconds", type=float, default=60.0, help="stop reading after this long")
    p.add_argument("--n-particles", type=int, default=None, help="stop after this many")
    p.add_argument("--warm", action="store_true", help="read everything once first")
    p.add_argument("--prefetch", action="store_true", help="through prefetch_batches")
    p.add_argument("--consume-ms", type=float, default=0.0,
                   help="sleep this long per batch (the consumer's work)")
    p.add_argument("--read-threads", type=int, default=None,
                   help="reader threads per batch (MrcStackImageSource read_threads)")
    p.add_argument("--check", action="store_true", help="check each image's particle number")
    p.add_argument("--float16", action="store_true", help="with --check: stacks are float16")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"make": make, "star": star, "read": read}[args.command](args)


if __name__ == "__main__":
    main()
