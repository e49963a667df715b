"""Schema migrations of the embedded SQLite store, one module per schema version.

Each module names the ``VERSION`` it brings a store to and the ``STATEMENTS`` that
take a store of the version before it there; a new store is created at the newest
version directly (its tables already have every column).
"""
