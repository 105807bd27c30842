"""The end-to-end harness's own tests (`qemu-test --workflow`): the harness against a busybox
guest running the real agent, and the agent's wire format against our workflow server.

The provisioning scenarios themselves (disk workflow, failing and timed-out actions, the
agent behind credentials, a late registry, syslog) run against the real Tinkerbell in
tests/lab/: our own workflow server is a model, and a model is not the evidence that a seam
works. It stays for what needs no root network setup (`qemu-test --workflow`).
"""
