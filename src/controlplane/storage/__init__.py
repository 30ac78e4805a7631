"""Records: SQLModel tables, the database, and the one write path."""
