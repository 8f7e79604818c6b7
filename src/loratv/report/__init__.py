"""Renderings of comparison and precision records: a text report and PNG plots."""
