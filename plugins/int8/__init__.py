"""ftq's int8 inference: the numerics (:mod:`.numerics`, the one home of every scale, round and clamp rule), the
kernels and how one is chosen, the int8 modules, and the work sibling layers share."""
