"""What a node serves besides the native protocol: the HTTP API."""
