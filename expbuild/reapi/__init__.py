"""One home per Remote Execution API concept, shared by the server, the CAS, the worker and
the client: ByteStream resource names (`resource_names`) and blob compression
(`compression`). Nothing here does I/O or knows gRPC."""
