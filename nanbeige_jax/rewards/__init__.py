"""Verifiable rewards: answer checking for generated completions."""
