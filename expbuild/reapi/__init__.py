"""One home per Remote Execution API concept, shared by the server, the CAS, the worker and
the client: ByteStream resource names (`resource_names`), blob compression
(`compression`), Merkle trees of local directories (`merkle`), platforms (`platforms`)
and the error table (`status`). Only `merkle` reads files (local directories, from a
thread); only `status` knows gRPC (its StatusCode enum and the status-details trailer)."""
