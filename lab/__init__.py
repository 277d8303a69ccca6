"""The privileged lab: namespaces, veth pairs, a broker process, QEMU and a guest.

Used by the demo, the tests and the benchmarks; the daemon never imports it."""
