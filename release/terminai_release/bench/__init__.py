"""Benchmarks (`inv bench`): each result is a ratio against a baseline
measured in the same run, because timings on shared machines are noisy."""
