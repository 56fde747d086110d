"""Feedback data: Arrow schemas, validation with quarantine, Ray Data ingest into group examples,
watermarks, and adapters for public preference data."""
