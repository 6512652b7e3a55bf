"""Small numeric kernels. `reference.py` holds the plain-torch versions: the specification and the test oracle.
The CPU kernels and the step of load() that puts them in place are in cpu.py (`prepare_for_cpu`)."""

from .reference import apply_rope, rms_norm, rope_cos_sin, silu_mul

__all__ = ["apply_rope", "rms_norm", "rope_cos_sin", "silu_mul"]
