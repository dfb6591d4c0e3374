"""Running clusters: Config.txt and settings, the local process manager, the `cluster up` supervisor."""
