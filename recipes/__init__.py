"""Makes this folder the package ``vitedge._shipped.recipes`` (see pyproject.toml and vitedge/_shipped/__init__.py):
that is how the shipped recipes get into the wheel and are found from an editable install. Nothing to import."""
