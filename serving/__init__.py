"""The BentoML service for the exported champion (see the serving issue)."""
