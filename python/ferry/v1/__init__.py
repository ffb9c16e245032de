"""Python modules generated from proto/ferry/v1 by the build (see setup.py); never edited by hand."""
