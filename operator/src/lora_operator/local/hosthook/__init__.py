"""The directory the local pod runner puts first on a pod's PYTHONPATH (see sitecustomize)."""
