"""`modelctl`: the command line for people (tables) and scripts (--output json)."""
