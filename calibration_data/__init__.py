"""Makes this folder the package ``vitedge._shipped.calibration_data`` (see pyproject.toml and vitedge/_shipped/__init__.py):
that is how the shipped images get into the wheel and are found from an editable install. Nothing to import."""
