"""Latency, throughput and memory measurements, side by side."""
