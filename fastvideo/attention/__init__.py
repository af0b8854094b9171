from fastvideo.attention.layer import DistributedAttention, LocalAttention

__all__ = ["DistributedAttention", "LocalAttention"]
