"""Learning: physical layers, the PAT autograd function, trainers. Never imports `farm`."""
from .config import PATConfig
from .pat import train_pat
from .types import Dataset, Device, TrainResult

__all__ = ["PATConfig", "train_pat", "Dataset", "Device", "TrainResult"]
