"""The KV block manager's lower tiers: host RAM (G2), local disk (G3), a shared store (G4).

`record` frames a block for storage (checksum, namespace), `policy` holds the
pure decisions (when a block moves down, capacity and eviction inside a tier),
`tier` the contract a tier plugin implements, `tiers/` the built-in tiers and
`manager` the `TieredCache` an engine drives: it offloads blocks the device
cache computed or evicted and finds and fetches a prefix's blocks for onboarding.
"""
