"""KVzip (arXiv 2505.23416) with any score: the policy family, its reconstruction prompt and head ratings."""

from obcache.policies.kvzip.calibration import HeadRatings, calibrate
from obcache.policies.kvzip.policy import KVzip, KVzipHeads, KVzipReplay

__all__ = ["HeadRatings", "KVzip", "KVzipHeads", "KVzipReplay", "calibrate"]
