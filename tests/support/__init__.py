"""Helpers shared by the test suites: worker processes and a minimal AMQP "gateway" client."""
