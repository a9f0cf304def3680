"""Memory accounting: a tensor-bytes meter (CPU and meta) and a per-device predictor from the schedule."""

from .predict import CellCost, Prediction, profile, simulate, simulate_plain
from .tracker import Curve, TensorMemory

__all__ = ["CellCost", "Curve", "Prediction", "TensorMemory", "profile", "simulate", "simulate_plain"]
