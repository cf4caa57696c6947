"""What one exchange looked like, and where that record goes."""
