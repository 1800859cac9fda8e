"""Why Qt's xcb platform plugin would not load, in words a user can act on.

When the xcb plugin (Qt's X11 back end) cannot be loaded, Qt aborts the whole process (it cannot
be caught) and, from Qt 6.5, says that "xcb-cursor0 or libxcb-cursor0 is needed" whichever of
its libraries is actually missing. Before a window is made, :func:`xcb_problem` lists the shared
libraries of the plugin that the dynamic loader cannot find (``ldd`` on the plugin; where there
is no ``ldd`` or no plugin file, ``ctypes.util.find_library`` on the libraries Qt's xcb plugin
needs) and names the Debian/Ubuntu packages that provide them. Nothing here makes a window or a
``QApplication``; only :func:`xcb_plugin_path` imports ``qtpy.QtCore``.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

LIBRARY_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",  # Qt 5 only
    "libxcb-xinput.so.0": "libxcb-xinput0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libdbus-1.so.3": "libdbus-1-3",
}
"""Shared library (soname) -> the Debian/Ubuntu package that provides it (the names
scripts/test.sh installs)."""

XCB_PLUGIN_LIBRARIES = (
    "libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-image.so.0", "libxcb-keysyms.so.1",
    "libxcb-randr.so.0", "libxcb-render-util.so.0", "libxcb-shape.so.0", "libxcb-xfixes.so.0",
    "libxcb-xkb.so.1", "libxcb.so.1", "libxkbcommon-x11.so.0", "libxkbcommon.so.0",
    "libX11-xcb.so.1", "libX11.so.6",
)
"""What Qt 6's xcb plugin links to beyond Qt itself: checked by name where ``ldd`` cannot be
run on the plugin."""

_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def uses_xcb(environ: Mapping[str, str] | None = None, *, platform: str | None = None) -> bool:
    """Whether Qt will pick its xcb plugin: on Linux, ``QT_QPA_PLATFORM`` names xcb first, or is
    unset with an X display and no Wayland one (where Qt may use Wayland, nothing is claimed)."""
    environ = os.environ if environ is None else environ
    if not (platform or sys.platform).startswith("linux"):
        return False
    chosen = environ.get("QT_QPA_PLATFORM", "").strip()
    if chosen:
        return chosen.split(";")[0].split(":")[0].strip() == "xcb"
    return bool(environ.get("DISPLAY")) and not environ.get("WAYLAND_DISPLAY")


def xcb_plugin_path() -> Path | None:
    """``platforms/libqxcb.so`` of the Qt that qtpy picks, or None (no Qt, or no such file)."""
    try:
        from qtpy.QtCore import QLibraryInfo
    except (ImportError, RuntimeError) as err:  # no Qt binding (qtpy.PythonQtError)
        logger.debug("no Qt binding to check: %s", err)
        return None
    if hasattr(QLibraryInfo, "path"):  # Qt 6
        plugins = QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)
    else:  # Qt 5
        plugins = QLibraryInfo.location(QLibraryInfo.PluginsPath)
    plugin = Path(plugins) / "platforms" / "libqxcb.so"
    return plugin if plugin.is_file() else None


def _ldd(path: Path) -> str | None:
    """``ldd``'s report on ``path``, or None where ``ldd`` is missing or fails."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    proc = subprocess.run([ldd, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    return proc.stdout if proc.returncode == 0 else None


def missing_libraries(plugin: Path | None, *,
                      find_library: Callable[[str], str | None] | None = None) -> list[str]:
    """Sonames the dynamic loader cannot find for ``plugin`` (``ldd``), or, without the plugin
    file or ``ldd``, those of :data:`XCB_PLUGIN_LIBRARIES` that ``find_library`` (default
    ``ctypes.util.find_library``) does not find."""
    find_library = find_library or ctypes.util.find_library
    report = _ldd(plugin) if plugin is not None else None
    if report is not None:
        return list(dict.fromkeys(_NOT_FOUND.findall(report)))
    missing = []
    for soname in XCB_PLUGIN_LIBRARIES:
        stem = soname.removeprefix("lib").split(".so")[0]
        if find_library(stem) is None:
            missing.append(soname)
    return missing


def packages_for(sonames: list[str]) -> list[str]:
    """The Debian/Ubuntu packages of ``sonames``, in order, without repeats; a library not in
    :data:`LIBRARY_PACKAGES` is given as its own name."""
    return list(dict.fromkeys(LIBRARY_PACKAGES.get(s, s) for s in sonames))


def xcb_problem(environ: Mapping[str, str] | None = None, *,
                plugin: Path | None = None) -> str | None:
    """One line naming the missing libraries of Qt's xcb plugin and the ``apt-get install``
    that brings them, or None when Qt will not use xcb or nothing is missing. ``plugin``
    defaults to :func:`xcb_plugin_path`."""
    if not uses_xcb(environ):
        return None
    missing = missing_libraries(plugin if plugin is not None else xcb_plugin_path())
    if not missing:
        return None
    return (f"Qt's xcb platform plugin cannot load: {', '.join(missing)} not found (whatever Qt "
            "says about xcb-cursor0); on Debian/Ubuntu install them with: sudo apt-get install "
            + " ".join(packages_for(missing)))


__all__ = ["LIBRARY_PACKAGES", "missing_libraries", "packages_for", "uses_xcb", "xcb_problem"]
