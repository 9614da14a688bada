"""Reporting: the result file, metrics, leaderboard tables, rendered pages, figures and terminal reports."""
