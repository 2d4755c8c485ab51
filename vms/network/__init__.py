"""Host plumbing for sandbox networking, without Django: the product's network namespace and its
link to the host (``netns``), a bridge per network (``bridge``), the nftables rules that isolate
guests and apply their egress policy and port forwards (``ruleset``), and a resolver per VM that
enforces domain allow-lists (``dns``). The VMM side (TAP devices) lives in ``tap``.

Everything is driven by the commands and the worker, which hold the state (networks, leases,
forwards, policies) and call these functions with validated values; see docs/networking.md.
"""
