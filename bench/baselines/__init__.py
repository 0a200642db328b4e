"""Baseline servers the coordinator is compared with, each runnable as a process."""
