"""Slack: Block Kit cards and a local stand-in for the Slack Web API."""
