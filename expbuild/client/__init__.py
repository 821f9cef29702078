"""REAPI v2 client library: CAS transfers, input trees, action building and execution.

Used by the `expbuild run` / `expbuild execute` commands, by the worker daemon (to fetch
inputs and upload outputs) and by tests. Every failure surfaces as an
`expbuild.errors.ExpBuildError`; gRPC types never leak to callers except the channel.
"""
