"""Benchmarks on random weights of the real Gemma 4 geometries (GPU): memory and speed, side by side."""
