"""Evaluation: preference metrics, exact ground-truth metrics, convergence."""
