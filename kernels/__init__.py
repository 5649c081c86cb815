"""linvision.kernels: the kernel layer, one folder per operation (PyTorch reference beside Triton kernel).

Needs only torch (and triton for the GPU path). Layout everywhere is ``[B, N, H, D]``.

- ``linvision.kernels.linear_attention.linear_attention``: bidirectional linear attention.
"""
