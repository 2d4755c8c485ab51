"""chsim: a test-only simulator of the Cloud Hypervisor v53 REST API.

It answers on a unix socket the way the *released* v53 server does according to
``tests/reference/cloud-hypervisor-notes.md`` (500 where the spec says 405, error bodies as
arrays of strings, vmm.shutdown 200, ...), takes its routes and request schemas from the OpenAPI
document beside those notes, and models one VM's state machine, snapshot files, hybrid vsock and
the serial socket. ``python -m tests.chsim --api-socket path=...`` runs it as a fake
``cloud-hypervisor``. Nothing in the product imports it.
"""
