"""Evaluation: agreement with the AR teacher under the same noise, sample quality, decode speed, reports."""
