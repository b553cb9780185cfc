"""`pcam-prep stats`: the EDA every notebook redoes (collect), and its HTML/PNG report (report)."""

from .collect import Eda, EdaOptions, collect

__all__ = ["Eda", "EdaOptions", "collect"]
