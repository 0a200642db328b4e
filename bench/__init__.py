"""Benchmarks of the coordinator against the baselines users would pick instead.

Run ``python -m bench.run [--quick|--full] [--only NAME]``; see BENCHMARKS.md.
"""
