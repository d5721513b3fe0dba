"""Layer 10 (above :mod:`bora.api`): the ``bora`` command line."""
