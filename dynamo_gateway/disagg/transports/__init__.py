"""The built-in KV transports: `inprocess`, `shm` and `tcp` (registered by
`dynamo_gateway.default_plugins.transports`)."""
