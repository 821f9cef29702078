"""The domain layer: what the service does, below the gRPC servicers.

A servicer in `expbuild.server` translates protobuf requests into calls here and the
answers back; the policy lives here, one module per concept:

- `actions`: load an Action and its Command from the CAS and check them (timeout, platform)
- `cached_results`: look up and store action results, only ones whose blobs are all present
- `submission`: submit an action: answer from the cache, or queue (join) a task
- `operations`: follow, list and cancel operations; their stage and final response
- `leases`: hand out leases to polling workers, with the Action and Command inlined
- `results`: accept (or refuse) a worker's result, hand a lease back
- `workers`: register, heartbeat and deregister workers
- `task_names`: the `task-<id>` names tasks have outside the database

Calls made for a client or a worker take its `expbuild.auth.principal.Principal` (the
servicer reads it from the auth context variable): whose operations it may see and which
worker ids it may act for is decided here (`operations.owner_filter`,
`workers.acting_worker`), not in the servicers.

It raises `expbuild.errors` classes, never gRPC statuses, and holds no state of its own:
everything is in PostgreSQL (`expbuild.db`) or the CAS (`expbuild.cas`).
"""
