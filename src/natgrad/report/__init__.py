"""The HTML report comparing trained models: tables as in the paper, training curves and figures."""

from natgrad.report.html import build_report, write_report

__all__ = ["build_report", "write_report"]
