"""gRPC servicers: thin adapters from protobuf requests to `expbuild.db` and `expbuild.cas`."""
