"""One home per Remote Execution API concept, shared by the server, the CAS, the worker and
the client: ByteStream resource names (`resource_names`), blob compression
(`compression`) and the lexicon's OSFamily spelling (`os_family`). Nothing here does I/O or knows gRPC."""
