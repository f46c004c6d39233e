"""Built-in policies; importing this package registers them (see ``vtprune.methods()``)."""
from . import baselines, fastv  # noqa: F401
