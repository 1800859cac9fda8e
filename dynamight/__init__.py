"""``from dynamight import cli; exit(cli())``: RELION-5's default DynaMight executable.

RELION-5's DynaMight job runs ``relion_python_dynamight`` unless told otherwise, a wrapper that
starts ``python -c "from dynamight import cli; exit(cli())"`` with the job's arguments. This
package makes that line run our ``dynamight`` command (:func:`relion_external.cli.main`) and
exit with its return code, so that the wrapper works with this package installed in its place.
"""

from __future__ import annotations


def cli(argv: list[str] | None = None) -> int:
    """Run the ``dynamight`` command on ``argv`` (default: ``sys.argv[1:]``); its exit code."""
    from relion_external.cli import main

    return main(argv)


__all__ = ["cli"]
