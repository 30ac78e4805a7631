"""The edge: the only package that touches generated protobuf types."""
