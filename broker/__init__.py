"""govbroker: the control plane an e-government cloud center runs in front of its hypervisors."""

__version__ = "0.1.0"
