"""The ``pymesh`` command line, in istioctl's vocabulary."""
