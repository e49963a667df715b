"""Alembic migrations of the PostgreSQL store (applied by ``tether migrate``)."""
