"""prefsel: preference-data selection by DPO implicit reward gap, and preference training, on Ray."""

__version__ = "0.1.0"
