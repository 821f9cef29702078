"""The database layer: every read and write of ExpBuild's durable state.

Each module owns one concept (queue, workers, operations, action cache, migrations);
the statements they run are named queries in `expbuild/sql/`.
"""
