"""The BentoML service for the exported champion, and the file helpers the pipeline shares with it."""
