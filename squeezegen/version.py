"""The package's version, apart from the package root: modules inside the package never import the root."""

__version__ = "0.1.0"
