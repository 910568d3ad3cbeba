"""Routing: rules that turn a completed study into jobs."""
