"""The ExpBuild worker daemon: leases actions from the server's queue and runs them.

A worker only ever dials out: it registers with the server's Worker API, long-polls for
tasks, keeps their leases alive with heartbeats and reports each outcome with
CompleteTask. Inputs and outputs move through the CAS with `expbuild.client`.

Modules:

- `agent`: `WorkerAgent`, the protocol loop (register, heartbeat, poll, shutdown).
- `runner`: `TaskRunner`, one task end to end: inputs, execution, outputs, ExecuteResponse.
- `inputs`: the per-task action directory and its input root.
- `executor`: the execution backend interface; `host`: the `host` backend.
- `outputs`: turning what an action left on disk into an ActionResult and CAS blobs.
- `paths`: validation of the relative paths a Command names.

Nothing here imports `expbuild.server` or `expbuild.db`: a worker host needs neither.
"""
