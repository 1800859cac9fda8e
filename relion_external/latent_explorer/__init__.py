"""The latent-space explorer: a napari window (:mod:`.viewer`, imported only when a window is
wanted) and the same actions without one (:mod:`.headless`), both over an
:class:`~.session.ExplorerSession`. Nothing here imports napari or Qt."""

from .colours import COLOURINGS, colour_values
from .headless import HeadlessOutputs, run_actions, write_embedding_plot
from .movie import MovieResult, projection_frames, write_volume_series
from .session import ExplorerSession, LatentPoint, open_session
from .subsets import SubsetResult, next_subset_path, write_subset

__all__ = [
    "COLOURINGS",
    "ExplorerSession",
    "HeadlessOutputs",
    "LatentPoint",
    "MovieResult",
    "SubsetResult",
    "colour_values",
    "next_subset_path",
    "open_session",
    "projection_frames",
    "run_actions",
    "write_embedding_plot",
    "write_subset",
    "write_volume_series",
]
