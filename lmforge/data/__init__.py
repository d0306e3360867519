"""Reading and cleaning sources: what stage ingest uses."""
