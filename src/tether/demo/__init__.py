"""The bundled scenario behind ``make demo``."""

from tether.demo._scenario import run

__all__ = ["run"]
