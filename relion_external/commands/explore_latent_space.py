"""Explore the latent space of optimize-deformations in napari, or without a window.

The window: the particles of a half set as points of a 2D embedding of their latent codes (PCA;
UMAP with --embedding umap when umap-learn is installed), coloured by a choice of amount,
direction and location of motion, deformation error, half-set agreement, particle index, tilt,
shift or density. Clicking shows the map of that latent point (the half's deformed Gaussian
model) in a second, 3D viewer with arrows from the consensus Gaussians to the deformed ones,
coloured by the per-Gaussian deformation error. Drawing a path (shapes layer, path tool) makes a
movie: maps along it written to OUTPUT_DIR/latent_space/movies/movie_NNN/ (frame_*.mrc and
movie.gif) and shown as a time series. Drawing a polygon writes the particles inside it to
OUTPUT_DIR/subsets/subset_N.star, ready as input of the next RELION job.

--half-set 1 or 2 shows that half's particles; 0 shows the validation particles (trained by
neither half) seen through both halves. The window needs the gui extra
(pip install "dynamight-relion[gui]") and a display.

Without a window (--headless, or implied by any action below; nothing of napari or Qt is
imported), OUTPUT_DIR/latent_space/embedding_half{H}.png shows the embedding with its
coordinates, and the actions take such coordinates (write negative numbers as --opt=-1,2):
  --maps-along-pcs K            maps from -2 to +2 standard deviations along the first K
                                principal latent directions (latent_space/maps_along_pcs/)
  --movie-from X,Y --movie-to X,Y (or --movie-path "X,Y;X,Y;...") --n-frames N
                                a movie along that line or polyline
  --subset-polygon "X,Y;X,Y;..."  a subset of the particles inside the polygon
  --subset-clusters K           k-means of the latent codes: one subset per cluster
--screenshot PNG saves a picture of both viewers (needs a display, e.g. xvfb-run).
Without a display (RELION on a compute node, say) the window is replaced by the headless
outputs: the embedding plot and maps along the first 2 principal directions, with a note.

RELION-5's DynaMight job runs `explore-latent-space DIR --half-set H [--checkpoint-file C]`
for "Do visualization?".

Examples:
  dynamight explore-latent-space DynaMight/job020/ --half-set 1
  dynamight explore-latent-space DynaMight/job020/ --half-set 1 --maps-along-pcs 2
  dynamight explore-latent-space DynaMight/job020/ --half-set 1 \\
      --subset-polygon "0,0;2,0;2,2;0,2"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from dynamight_core.device import choose_device
from dynamight_core.latent_analysis import COLOURINGS, EMBEDDINGS

from ..errors import InputError

logger = logging.getLogger(__name__)

FALLBACK_MAPS_ALONG_PCS = 2  # written instead of the window when there is no display


def add_args(p) -> None:
    p.add_argument("output_directory", metavar="OUTPUT_DIR",
                   help="output directory of optimize-deformations")
    p.add_argument("--half-set", type=int, default=1, choices=(0, 1, 2),
                   help="1 or 2: that half's particles; 0: the validation particles seen "
                        "through both halves (default 1)")
    p.add_argument("--checkpoint-file", default=None,
                   help="forward checkpoint (default: OUTPUT_DIR/forward_deformations/"
                        "checkpoints/checkpoint_final.pth)")
    p.add_argument("--gpu-id", default=None, help="GPU to use (default: CPU)")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="pca",
                   help="2D embedding of the latent codes (umap needs umap-learn)")
    p.add_argument("--colour-by", "--color-by", dest="colour_by", type=_colouring,
                   default="amount of motion", metavar="NAME",
                   help="colouring of the points (plot, first view): "
                        + ", ".join(c.replace(" ", "-") for c in COLOURINGS))
    p.add_argument("--n-frames", type=int, default=10, help="maps per movie (default 10)")
    p.add_argument("--rendering", choices=("attenuated_mip", "iso", "mip"),
                   default="attenuated_mip",
                   help="how the window draws maps: iso is the crispest but needs hardware "
                        "OpenGL (about 30 s per view of a 128^3 map in software, e.g. over "
                        "ssh -X); attenuated_mip (default) takes under 1 s there")
    g = p.add_argument_group("without a window")
    g.add_argument("--headless", action="store_true",
                   help="no window: run the actions below and write the embedding plot")
    g.add_argument("--maps-along-pcs", type=int, default=0, metavar="K")
    g.add_argument("--movie-from", default=None, metavar="X,Y")
    g.add_argument("--movie-to", default=None, metavar="X,Y")
    g.add_argument("--movie-path", default=None, metavar="X,Y;X,Y;...")
    g.add_argument("--track-movie", type=int, default=None, metavar="TRACK",
                   help="time series: maps of track TRACK's molecule through time, at the "
                        "codes of its particles in order of rlnDynaMightTime (--n-frames of "
                        "them, evenly spaced)")
    g.add_argument("--subset-polygon", default=None, metavar="X,Y;X,Y;...")
    g.add_argument("--subset-clusters", type=int, default=0, metavar="K")
    g.add_argument("--screenshot", default=None, metavar="PNG",
                   help="save a picture of both viewers and exit (needs a display)")
    g.add_argument("--point", default=None, metavar="X,Y",
                   help="latent point shown first (default: the centre of the embedding)")


def _colouring(text: str) -> str:
    """A colouring name, with ``-`` or ``_`` in place of spaces if need be."""
    def norm(name):
        return name.lower().replace("_", " ").replace("-", " ")
    for name in COLOURINGS:
        if norm(name) == norm(text):
            return name
    raise argparse.ArgumentTypeError(
        f"unknown colouring {text!r}; one of " + ", ".join(c.replace(" ", "-")
                                                           for c in COLOURINGS))


def _coordinates(args):
    """Parsed coordinates of the actions; :class:`InputError` naming the option at fault."""
    from ..latent_explorer.headless import parse_point, parse_points

    def parse(option, text, parser):
        try:
            return parser(text)
        except ValueError as err:
            raise InputError(None, option, str(err),
                             "Give coordinates of the embedding plot, e.g. 1.5,-0.2 "
                             "(write negative numbers as --option=-1,2).") from err

    movie = None
    if args.movie_path:
        movie = parse("--movie-path", args.movie_path, parse_points)
    elif args.movie_from or args.movie_to:
        if not (args.movie_from and args.movie_to):
            raise InputError(None, "--movie-from/--movie-to", "both are needed",
                             "Give both ends, e.g. --movie-from=-1,0 --movie-to 1,0.")
        movie = np.stack([parse("--movie-from", args.movie_from, parse_point),
                          parse("--movie-to", args.movie_to, parse_point)])
    polygon = None
    if args.subset_polygon:
        polygon = parse("--subset-polygon", args.subset_polygon, parse_points)
        if polygon.shape[0] < 3:
            raise InputError(None, "--subset-polygon", "a polygon needs 3 or more vertices",
                             'Give e.g. "0,0;1,0;1,1".')
    point = parse("--point", args.point, parse_point) if args.point else None
    return movie, polygon, point


def _has_display() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _check_qt_libraries() -> None:
    """Fail with the packages to install, before Qt aborts the process over its xcb plugin."""
    from ..latent_explorer.qt_libraries import xcb_problem

    problem = xcb_problem()
    if problem is not None:
        raise InputError(None, "Qt", problem,
                         "Or run without a window: --headless (see --help).")


def main(args, control) -> None:
    from ..latent_explorer.headless import run_actions
    from ..latent_explorer.session import TrackNotFound, open_session

    movie, polygon, point = _coordinates(args)
    if args.n_frames < 2:
        raise InputError(None, "--n-frames", f"must be at least 2, got {args.n_frames}",
                         "Give the number of maps per movie, e.g. 10.")
    actions = bool(args.maps_along_pcs or movie is not None or polygon is not None
                   or args.subset_clusters or args.track_movie is not None)
    window = not (args.headless or actions or args.screenshot)
    maps_along_pcs = args.maps_along_pcs
    if args.screenshot and not _has_display():
        raise InputError(None, "--screenshot", "no display to draw the viewers on "
                         "(DISPLAY is not set)",
                         "Run under xvfb-run, or on a machine with a display.")
    if window and not _has_display():  # RELION runs it without --headless, maybe on a node
        window, maps_along_pcs = False, FALLBACK_MAPS_ALONG_PCS
        logger.info("note: no display (DISPLAY is not set), so no napari window: writing the "
                    "headless outputs instead (embedding plot and maps along %d principal "
                    "directions in %s); open the window with `dynamight explore-latent-space "
                    "%s --half-set %d` on a machine with a display", maps_along_pcs,
                    Path(args.output_directory) / "latent_space", args.output_directory,
                    args.half_set)
    if window or args.screenshot:
        _check_qt_libraries()
    try:
        session = open_session(args.output_directory, args.half_set,
                               checkpoint_file=args.checkpoint_file,
                               device=choose_device(args.gpu_id), embedding=args.embedding,
                               control=control)
    except ImportError as err:
        raise InputError(None, "--embedding", str(err),
                         "Install umap-learn or use --embedding pca.") from err
    if not window:
        try:
            run_actions(session, maps_along_pcs=maps_along_pcs, movie_path=movie,
                        n_frames=args.n_frames, subset_polygon=polygon,
                        subset_clusters=args.subset_clusters, colouring=args.colour_by,
                        track_movie=args.track_movie, control=control)
        except TrackNotFound as err:
            raise InputError(session.star.path, "rlnDynaMightTrack", str(err),
                             "Pick a track of this half set (--half-set), from "
                             "particles.star.") from err
    if args.screenshot:
        from ..latent_explorer import viewer

        viewer.save_screenshot(session, args.screenshot, colour_by=args.colour_by, point=point,
                               rendering=args.rendering)
    if window:
        from ..latent_explorer import viewer

        viewer.launch(session, colour_by=args.colour_by, n_frames=args.n_frames, point=point,
                      rendering=args.rendering)
