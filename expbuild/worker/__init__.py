"""The ExpBuild worker daemon: leases actions from the server's queue and runs them.

A worker only ever dials out: it registers with the server's Worker API, long-polls for
tasks, keeps their leases alive with heartbeats and reports each outcome with
CompleteTask. Inputs and outputs move through the CAS with `expbuild.client`.

Modules:

- `agent`: `WorkerAgent`, the protocol loop (register, heartbeat, poll, shutdown).
- `runner`: `TaskRunner`, one task end to end: inputs, execution, outputs, ExecuteResponse.
- `inputs`: the per-task action directory and its input root.
- `blob_cache`: the local blob cache input files are hardlinked from.
- `execution`: the execution backend interface (request, outcome, `Executor`);
  `executor`: `make_executor`, the configured backend.
- `host`, `sandbox`, `docker`: the backends (plain process, bubblewrap, container).
- `supervisor`: runs a command under `launcher` (a separate, stdlib-only program that
  subreaps, applies rlimits and kills every leftover process), in its cgroup;
  `zygote`: the client of the launcher's fork server, which starts those launchers fast.
- `host_platform`: the OS, ISA and CPUs a worker advertises unless configured otherwise.
- `cgroups`: per-action cgroups (tracking, memory, pids, cpu); `limits`: `[worker.limits]`
  enforcement and the messages that say which limit an action hit.
- `outputs`: turning what an action left on disk into an ActionResult and CAS blobs.
- `paths`: validation of the relative paths a Command names.
- `action_user`: which user actions run as (`[worker.backend] run_as`).
- `action_log`: each action's own log, returned as `server_logs["worker.log"]`.
- `metrics`: the worker's Prometheus metrics (`[worker] metrics_address`).

Nothing here imports `expbuild.server` or `expbuild.db`: a worker host needs neither.
"""
