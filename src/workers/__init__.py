"""Workers: builds and serving. Only ray_backend.py imports ray."""
