"""Ids of the record, of executions and of identities: PostgreSQL bigints."""

MAX_BIGINT = 2**63 - 1
