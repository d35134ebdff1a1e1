"""What a snapshot reads: the files of a club data dir, and its SQLite databases."""
