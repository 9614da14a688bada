"""Detectors, their targets and their losses (GFL, DETR)."""
