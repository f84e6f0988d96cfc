"""The ``loratree`` command line: argument parsing and output, over the Python API."""
