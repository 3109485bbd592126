"""What the host shim and the guest agent must agree on, and nothing else.

``protocol`` is the wire format between them; ``bootcontract`` is what a
backend promises the guest at boot (init, console, ports, mount tags). Both
sides import this package, so it uses the standard library only: the guest
image copies it beside the agent, and the shim's own distribution carries it
without carrying the agent.
"""
