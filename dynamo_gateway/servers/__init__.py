"""Real etcd and nats-server processes on 127.0.0.1, for tests, benchmarks and
one-machine clusters. Each starts the Debian binary on free ports in a
directory of its own, waits until it answers, and can be stopped and started
again on the same ports (restart tests)."""
