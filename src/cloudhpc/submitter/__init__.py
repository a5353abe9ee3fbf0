"""submitter."""
