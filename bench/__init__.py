"""Benchmarks and the references they and the tests compare against; not part of the installed package."""
