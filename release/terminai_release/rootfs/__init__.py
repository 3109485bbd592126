"""The guest root filesystem: a cached Debian base layer built by mkosi, and
a project layer (agent, survival kit, init) packed into a read-only image."""
