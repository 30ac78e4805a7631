"""A gRPC control plane for the lifecycle of models served on Ray Serve."""
