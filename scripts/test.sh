#!/usr/bin/env bash
# Install everything the tests need (RELION 3.1 from Debian, torch, the package with its dev
# extra), check the code with ruff (a finding fails the run) and run the default test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_reconstruct >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[install] relion (Debian package, the independent reference for the tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null
  else
    echo "[install] cannot install RELION here (needs root and apt-get): RELION tests will skip"
  fi
fi
# Xvfb and Qt's system libraries for the napari explorer's window tests (skipped without them)
GUI_PKGS="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglib2.0-0 libfontconfig1 libdbus-1-3
  libxkbcommon-x11-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
  libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libxcb-xinerama0"
gui_libs() { command -v dpkg >/dev/null 2>&1 && dpkg -s $GUI_PKGS >/dev/null 2>&1; }
if ! gui_libs && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[install] Xvfb and Qt's libraries (Debian packages, for the napari explorer tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends $GUI_PKGS >/dev/null
fi
EXTRAS=dev
# the window tests run on PyQt5 (the gui extra), even where PyQt6 is installed too: qtpy (napari)
# and pytest-qt must pick the same binding
if gui_libs; then EXTRAS=dev,gui-test; export QT_API=pyqt5 PYTEST_QT_API=pyqt5; else
  echo "[install] no Xvfb/Qt libraries (needs root and apt-get): napari window tests will skip"
fi
source scripts/_install.sh
"$PY" -m pip install -q -e ".[$EXTRAS]"
echo "[lint] ruff check ."
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
