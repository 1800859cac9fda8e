"""Qt's xcb plugin without its libraries: one line naming the Debian/Ubuntu packages, found
before Qt would abort the process (no display, no Qt and no window needed: the library lookups
are replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relion_external.cli import main
from relion_external.latent_explorer import qt_libraries as ql

LDD_REPORT = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PyQt6/Qt6/lib/libQt6XcbQpa.so.6 (0x00007f61)
\tlibxkbcommon-x11.so.0 => /lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 (0x00007f62)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-randr.so.0 => /lib/x86_64-linux-gnu/libxcb-randr.so.0 (0x00007f63)
\tlibxcb-icccm.so.4 => not found
\tlibfoo-unknown.so.2 => not found
"""
X11 = {"DISPLAY": ":0"}


def test_ldd_report_names_each_missing_library_once_and_its_package(monkeypatch):
    monkeypatch.setattr(ql, "_ldd", lambda path: LDD_REPORT)
    missing = ql.missing_libraries(Path("libqxcb.so"))
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libfoo-unknown.so.2"]
    assert ql.packages_for(missing) == ["libxcb-cursor0", "libxcb-icccm4", "libfoo-unknown.so.2"]


def test_one_line_with_the_apt_get_command(monkeypatch):
    monkeypatch.setattr(ql, "_ldd", lambda path: LDD_REPORT)
    text = ql.xcb_problem(X11, plugin=Path("libqxcb.so"))
    assert "\n" not in text
    assert "libxcb-cursor.so.0, libxcb-icccm.so.4, libfoo-unknown.so.2 not found" in text
    assert text.endswith("sudo apt-get install libxcb-cursor0 libxcb-icccm4 libfoo-unknown.so.2")


def test_without_ldd_the_known_libraries_are_looked_up_by_name(monkeypatch):
    monkeypatch.setattr(ql, "_ldd", lambda path: None)
    absent = {"xcb-keysyms", "X11-xcb"}
    asked = []

    def find_library(name):
        asked.append(name)
        return None if name in absent else f"lib{name}.so"

    missing = ql.missing_libraries(Path("libqxcb.so"), find_library=find_library)
    assert missing == ["libxcb-keysyms.so.1", "libX11-xcb.so.1"]
    assert ql.packages_for(missing) == ["libxcb-keysyms1", "libx11-xcb1"]
    assert len(asked) == len(ql.XCB_PLUGIN_LIBRARIES)
    # no plugin file at all: the same lookup (ctypes.util.find_library by default)
    monkeypatch.setattr(ql.ctypes.util, "find_library", find_library)
    monkeypatch.setattr(ql, "xcb_plugin_path", lambda: None)
    assert "libxcb-keysyms1 libx11-xcb1" in ql.xcb_problem(X11)


def test_every_package_in_the_table_is_one_scripts_test_sh_installs_or_its_dependency():
    script = (Path(__file__).parents[1] / "scripts" / "test.sh").read_text()
    for soname in ql.XCB_PLUGIN_LIBRARIES:
        package = ql.LIBRARY_PACKAGES[soname]
        assert package in script or package in ("libxcb1", "libxkbcommon0", "libx11-6",
                                                "libxcb-util1"), package


def test_nothing_missing_means_no_message(monkeypatch):
    monkeypatch.setattr(ql, "_ldd", lambda path: LDD_REPORT.replace("not found", "/lib/x.so"))
    assert ql.xcb_problem(X11, plugin=Path("libqxcb.so")) is None


@pytest.mark.parametrize(("environ", "xcb"), [
    ({"DISPLAY": ":0"}, True),
    ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, False),
    ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}, False),
    ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "QT_QPA_PLATFORM": "xcb"}, True),
    ({"QT_QPA_PLATFORM": "xcb:display=:1"}, True),
    ({"QT_QPA_PLATFORM": "wayland;xcb"}, False),
    ({}, False),
])
def test_which_platform_qt_will_use(environ, xcb, monkeypatch):
    assert ql.uses_xcb(environ, platform="linux") is xcb
    monkeypatch.setattr(ql, "_ldd", lambda path: LDD_REPORT)
    assert (ql.xcb_problem(environ, plugin=Path("libqxcb.so")) is not None) is xcb


def test_not_on_macos_or_windows():
    assert not ql.uses_xcb({"DISPLAY": ":0"}, platform="darwin")
    assert not ql.uses_xcb({"DISPLAY": ":0"}, platform="win32")


def test_explore_latent_space_fails_with_the_packages_before_any_window(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.setattr(ql, "xcb_plugin_path", lambda: Path("libqxcb.so"))
    monkeypatch.setattr(ql, "_ldd", lambda path: LDD_REPORT)
    code = main(["explore-latent-space", str(tmp_path / "no_such_job"), "--half-set", "1"])
    assert code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "apt-get install" in line]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "sudo apt-get install libxcb-cursor0 libxcb-icccm4" in lines[0]
    assert "--headless" in lines[0]


def test_the_real_lookup_runs_here():
    """Whatever this machine has: the lookups run and return sonames."""
    missing = ql.missing_libraries(ql.xcb_plugin_path() if _has_qtpy() else None)
    assert all(".so" in soname for soname in missing)


def _has_qtpy() -> bool:
    try:
        import qtpy  # noqa: F401 - only whether it imports
    except (ImportError, RuntimeError):  # qtpy.PythonQtError without a binding
        return False
    return True
