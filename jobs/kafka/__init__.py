"""Kafka: a local KRaft broker for tests and demos, and the message schema of transactions."""
