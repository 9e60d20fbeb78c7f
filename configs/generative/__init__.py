"""Masked multi-task transformer configs."""
