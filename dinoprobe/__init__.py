"""dinoprobe: run a frozen DINOv3 backbone once, cache its features in HDF5, train heads on the cache."""

__version__ = "0.1.0"

from dinoprobe.errors import DinoprobeError  # noqa: E402,F401
