"""Training configurations (ml_collections); see configs/base.py."""
