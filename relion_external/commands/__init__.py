"""Sub-commands of the ``dynamight`` command line."""
