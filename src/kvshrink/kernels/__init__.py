"""Decode kernels for the fixed-shape step (`kvshrink.fast_decode`): `paged.py` is the op it calls (Triton on
CUDA, plain torch elsewhere), `decode_triton.py` the Triton kernel, imported only where Triton is."""
