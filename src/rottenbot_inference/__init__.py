"""RottenBot inference service: classifies produce photos as healthy or rotten."""

__version__ = "0.1.0"
