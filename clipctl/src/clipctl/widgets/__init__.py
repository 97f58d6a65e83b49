"""Reusable widgets: form fields, the loss plot, run details."""
