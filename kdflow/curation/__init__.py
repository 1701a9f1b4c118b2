"""Keeping the teacher's good answers: verification, filters, dedup, drop reports, self-instruct expansion."""
