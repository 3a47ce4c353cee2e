"""Dirty bitmap engine."""
